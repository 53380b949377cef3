"""The sampler hands its KV cache to the model under the keyword the installed transformers uses."""

import pytest
import torch
from torch import nn

from tether.engine.sampling.kv_cache import BatchKVCache
from tether.engine.sampling.model_runner import _cache_argument, _run
from tether.types.errors import ServerError


class NewApi(nn.Module):
    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0
    ):
        raise NotImplementedError


class OldApi(nn.Module):
    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        **kwargs,
    ):
        raise NotImplementedError


class IgnoresCache(nn.Module):
    """Takes the cache keyword but never writes into it (as a model building its own cache would)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"_attn_implementation": "sdpa", "layer_types": None})()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, 3)})()


def test_keyword_follows_the_forward_signature():
    assert _cache_argument(NewApi()) == "cache"
    assert _cache_argument(OldApi()) == "past_key_values"


def test_a_model_that_ignores_the_cache_is_refused_not_silently_wrong():
    cache = BatchKVCache()
    cache.start_rows(1)
    with pytest.raises(ServerError, match="did not write into the KV cache"):
        _run(IgnoresCache(), cache, torch.tensor([[1, 2, 3]]), logits_to_keep=1)
    assert cache.length == 0
