"""optim_step's `grad_accumulation_normalization` and cross_entropy's `response_tokens` over HTTP.

The official tinker SDK has no such keyword; Fireworks' SDK sends the field in the optim_step
request's extra body, which `extra_body_sdk` reproduces on the unmodified SDK. tether's own SDK
takes it as a keyword of `optim_step`. Adam's first step barely depends on the gradients' scale,
so these steps use a large `eps` to make the normalisation visible in the trained weights.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker._base_client import make_request_options  # noqa: E402
from tinker._compat import model_dump  # noqa: E402
from tinker.resources.training import AsyncTrainingResource  # noqa: E402
from tinker.types.shared.untyped_api_future import UntypedAPIFuture  # noqa: E402

from tests.compat.conftest import API_KEY  # noqa: E402

BASE = "tether/tiny-qwen3"
ADAM = {"learning_rate": 5e-2, "eps": 1.0, "weight_decay": 0.0}
TEXTS = [["hello tether", "abc"], ["the quick brown fox"]]
ZERO_PREFIX = 2
"""Each datum's first target positions have weight 0 (a prompt): they are not loss tokens."""
LOSS_TOKENS = sum(len(text) - 1 - ZERO_PREFIX for batch in TEXTS for text in batch)
SEQUENCES = sum(len(batch) for batch in TEXTS)


def _weights(text: str, scale: float) -> list[float]:
    return [0.0] * ZERO_PREFIX + [scale] * (len(text) - 1 - ZERO_PREFIX)


def _datum(module, text: str, scale: float = 1.0):
    """A byte-level SFT datum (the default model's tokenizer is bytes) of the SDK `module`'s types."""
    ids = list(text.encode())
    return module.Datum(
        model_input=module.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": _weights(text, scale)},
    )


PROBE_TEXT = "a probe of the trained weights"


def _probe(client, module) -> np.ndarray:
    out = client.forward([_datum(module, PROBE_TEXT)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


@pytest.fixture
def extra_body_sdk(monkeypatch) -> dict:
    """The official SDK's optim_step request with an extra body (what Fireworks' SDK sends); fill the dict."""
    extra: dict = {}

    async def optim_step(self, *, request):
        return await self._post(
            "/api/v1/optim_step",
            body=model_dump(request, exclude_unset=False, exclude_none=True, mode="json"),
            options=make_request_options(extra_body=dict(extra)),
            cast_to=UntypedAPIFuture,
        )

    monkeypatch.setattr(AsyncTrainingResource, "optim_step", optim_step)
    return extra


def test_official_sdk_extra_field_normalises_by_loss_tokens(service_client, extra_body_sdk):
    def client(seed: int = 11):
        return service_client.create_lora_training_client(base_model=BASE, rank=4, seed=seed).result()

    accumulated, mean, raw = client(), client(), client()
    # two raw-sum calls, then a step that divides by the loss tokens accumulated
    results = [accumulated.forward_backward([_datum(types, t) for t in b], "cross_entropy") for b in TEXTS]
    results = [r.result() for r in results]
    assert [r.metrics["response_tokens:sum"] for r in results] == [
        sum(len(t) - 1 - ZERO_PREFIX for t in batch) for batch in TEXTS
    ]
    extra_body_sdk["grad_accumulation_normalization"] = "num_loss_tokens"
    step = accumulated.optim_step(types.AdamParams(**ADAM)).result()
    assert step.metrics["grad_accumulation_divisor:mean"] == LOSS_TOKENS
    extra_body_sdk.clear()
    # one call of the mean-over-tokens loss, no normalisation
    data = [_datum(types, t, 1.0 / LOSS_TOKENS) for batch in TEXTS for t in batch]
    mean.forward_backward(data, "cross_entropy").result()
    reference = mean.optim_step(types.AdamParams(**ADAM)).result()
    assert "grad_accumulation_divisor:mean" not in reference.metrics
    assert step.metrics["grad_norm:mean"] == pytest.approx(reference.metrics["grad_norm:mean"], rel=1e-4)
    # the raw sum without normalisation (today's behaviour) lands elsewhere
    for batch in TEXTS:
        raw.forward_backward([_datum(types, t) for t in batch], "cross_entropy").result()
    raw.optim_step(types.AdamParams(**ADAM)).result()
    trained, expected, unnormalised = (_probe(c, types) for c in (accumulated, mean, raw))
    np.testing.assert_allclose(trained, expected, atol=2e-5)
    assert np.abs(unnormalised - expected).max() > 1e-3


def test_tether_sdk_keyword_normalises_by_sequences(server_url):
    import tether
    from tether.types.errors import UserInputError

    service = tether.ServiceClient(base_url=server_url, api_key=API_KEY)
    try:
        accumulated, mean = (
            service.create_lora_training_client(BASE, rank=4, seed=12).result() for _ in range(2)
        )
        for batch in TEXTS:
            out = accumulated.forward_backward([_datum(tether, t) for t in batch], "cross_entropy").result()
            assert (
                out.metrics["response_tokens"]
                == out.metrics["response_tokens:sum"]
                == sum(len(t) - 1 - ZERO_PREFIX for t in batch)
            )
            assert out.metrics["loss:sum"] / out.metrics["response_tokens"] > 0  # the mean NLL
        with pytest.raises(UserInputError) as bad:  # refused before sending: no seq_id spent
            accumulated.optim_step(tether.AdamParams(**ADAM), grad_accumulation_normalization="per_token")
        assert bad.value.field == "grad_accumulation_normalization"
        step = accumulated.optim_step(
            tether.AdamParams(**ADAM),
            grad_accumulation_normalization=tether.GradAccNormalization.NUM_SEQUENCES,
        ).result()
        assert step.metrics["grad_accumulation_divisor:mean"] == SEQUENCES
        data = [_datum(tether, t, 1.0 / SEQUENCES) for batch in TEXTS for t in batch]
        mean.forward_backward(data, "cross_entropy").result()
        reference = mean.optim_step(
            tether.AdamParams(**ADAM), grad_accumulation_normalization="none"
        ).result()
        assert step.metrics["grad_norm:mean"] == pytest.approx(reference.metrics["grad_norm:mean"], rel=1e-4)
        np.testing.assert_allclose(_probe(accumulated, tether), _probe(mean, tether), atol=2e-5)
    finally:
        service.close()


def test_an_unknown_mode_is_a_422_naming_the_field(server_url):
    answer = httpx.post(
        f"{server_url}/api/v1/optim_step",
        json={"model_id": "any", "seq_id": 1, "grad_accumulation_normalization": "mean"},
        headers={"X-API-Key": API_KEY},
        timeout=30,
    )
    assert answer.status_code == 422
    assert "grad_accumulation_normalization" in answer.json()["error"]
