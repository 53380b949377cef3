"""Split a request into micro-batches that fit a token budget, and run one micro-batch's forward.

The plan is plain Python (lengths in, index groups out) so it is tested without a model. Datums are
grouped longest first, which keeps padding small; every micro-batch is right-padded to its longest
datum and the padded size (rows x longest) stays within the budget, except that a single datum
longer than the budget forms a micro-batch of its own.

Right padding keeps every real token at the same position as in an unpadded run, and the attention
mask hides the padding from the real tokens, so a micro-batched request equals one big batch within
floating-point tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tether.engine.training_types import EngineDatum


def plan_micro_batches(lengths: Sequence[int], max_tokens_per_micro_batch: int) -> list[list[int]]:
    """Groups of datum indices; each group's rows x longest length is within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        grown = max(longest, lengths[index])
        if current and grown * (len(current) + 1) > max_tokens_per_micro_batch:
            batches.append(current)
            current, grown = [], lengths[index]
        current.append(index)
        longest = grown
    if current:
        batches.append(current)
    return batches


def target_logprobs(model: nn.Module, datums: Sequence[EngineDatum], device: torch.device) -> list[torch.Tensor]:
    """log p(target_tokens[i] | input_tokens[:i+1]) per datum, shaped like its target_tokens.

    Runs one padded forward pass; whether a graph is recorded follows the caller's grad mode.
    """
    lengths = [d.input_tokens.shape[0] for d in datums]
    targets = [d.loss_fn_inputs["target_tokens"] for d in datums]
    rows, longest = len(datums), max(lengths)
    width = max(1 if t.dim() == 1 else t.shape[1] for t in targets)
    input_ids = torch.zeros(rows, longest, dtype=torch.int64)
    target_ids = torch.zeros(rows, longest, width, dtype=torch.int64)
    for row, (datum, target) in enumerate(zip(datums, targets, strict=True)):
        input_ids[row, : lengths[row]] = datum.input_tokens
        target_ids[row, : lengths[row], : (1 if target.dim() == 1 else target.shape[1])] = target.reshape(lengths[row], -1)
    kwargs = {}
    if min(lengths) < longest:
        mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        kwargs["attention_mask"] = mask.to(device=device, dtype=torch.int64)
    logits = model(input_ids=input_ids.to(device), use_cache=False, **kwargs).logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    logprobs = logits.gather(-1, target_ids.to(device)) - log_normalizer
    out = []
    for row, target in enumerate(targets):
        picked = logprobs[row, : lengths[row], : (1 if target.dim() == 1 else target.shape[1])]
        out.append(picked.reshape(target.shape))
    return out
