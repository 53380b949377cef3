"""Pick the next token of every row of a batch of logits, each row with its own parameters.

Each row draws its randomness from its own `torch.Generator` (one uniform number per token), so a
seeded sequence gets the same tokens whatever else shares the batch. The draw is an inverse-CDF
lookup over the row's filtered distribution sorted by probability (stable sort, so ties break the
same way every time).

Logprobs reported to callers are untempered: `log_softmax` of the raw logits, whatever the
temperature, top-k or top-p used to choose the token.

This module knows nothing about models, caches or requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowSampling:
    """How one row picks its token."""

    temperature: float
    """0 = greedy (argmax)."""
    top_k: int = -1
    """-1 = no limit."""
    top_p: float = 1.0


def untempered_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary in float32: the logprobs reported for every token."""
    return torch.log_softmax(logits.float(), dim=-1)


def choose_tokens(
    logits: torch.Tensor, rows: Sequence[RowSampling], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """The next token of each row of `logits` (rows, vocab) as an int64 tensor (rows,).

    Greedy rows take the argmax and draw nothing; every other row draws exactly one uniform number
    from its generator (None = the global generator). Rows with top-k or top-p sort their
    distribution; rows without skip the sort (a full-vocabulary sort per row and step is the
    costliest part of sampling with large vocabularies).
    """
    logits = logits.float()
    vocab_size = logits.shape[1]
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, row in enumerate(rows) if row.temperature > 0]
    if not random_rows:
        return tokens
    # Generators live on the CPU so a seed means the same thing on every device.
    uniforms = {i: torch.rand((), generator=generators[i]) for i in random_rows}
    filtered = [i for i in random_rows if 0 < rows[i].top_k < vocab_size or rows[i].top_p < 1]
    plain = [i for i in random_rows if not (0 < rows[i].top_k < vocab_size or rows[i].top_p < 1)]
    for subset, draw in ((plain, _draw_plain), (filtered, _draw_filtered)):
        if subset:
            index = torch.tensor(subset, dtype=torch.long, device=logits.device)
            temperatures = torch.tensor([rows[i].temperature for i in subset], device=logits.device)
            scaled = logits.index_select(0, index) / temperatures[:, None]
            draws = torch.stack([uniforms[i] for i in subset]).to(scaled)
            tokens[index] = draw(scaled, draws, [rows[i] for i in subset])
    return tokens


def _draw_plain(scaled: torch.Tensor, uniforms: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Inverse-CDF draw over the full softmax, in vocabulary order."""
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
    positions = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)
    return positions.clamp(max=scaled.shape[1] - 1).squeeze(1)


def _draw_filtered(scaled: torch.Tensor, uniforms: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Inverse-CDF draw over the top-k / top-p subset, in order of decreasing probability."""
    vocab_size = scaled.shape[1]
    top_ks = torch.tensor(
        [r.top_k if 0 < r.top_k < vocab_size else vocab_size for r in rows], device=scaled.device
    )
    top_ps = torch.tensor([r.top_p for r in rows], device=scaled.device)
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab_size, device=scaled.device)[None, :] < top_ks[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # Nucleus: keep a token while the mass before it is below top_p, so the most likely always stays.
    keep &= (probs.cumsum(dim=-1) - probs) < top_ps[:, None]
    cdf = probs.masked_fill(~keep, 0.0).cumsum(dim=-1)
    positions = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)
    positions = torch.minimum(positions, keep.sum(dim=-1, keepdim=True) - 1)
    return sorted_ids.gather(1, positions).squeeze(1)


def make_generator(seed: int | None, sample_index: int, fallback_seed: int) -> torch.Generator:
    """A CPU generator for one sample: from the request's seed (distinct per sample) or `fallback_seed`."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.manual_seed(fallback_seed)
    else:
        # Spread samples of one seed apart with a 64-bit odd constant (golden ratio), modulo 2**64.
        generator.manual_seed((seed + sample_index * 0x9E3779B97F4A7C15) % (1 << 64))
    return generator
