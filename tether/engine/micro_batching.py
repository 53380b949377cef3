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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


@dataclass
class MicroBatchLogprobs:
    """Target logprobs of one micro-batch's real tokens, flattened datum after datum.

    `flat` is (T,) when every datum has 1-D targets, else (T, K) with K the widest datum's and
    zeros beyond each datum's own width. Elementwise losses can run on `flat` in one go when all
    datums share a target shape (`uniform`), instead of once per datum.
    """

    flat: torch.Tensor
    lengths: list[int]
    target_shapes: list[torch.Size]

    @property
    def uniform(self) -> bool:
        return all(shape[1:] == self.target_shapes[0][1:] for shape in self.target_shapes)

    def per_datum(self, values: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`values` (default `flat`), shaped like `flat`, cut into one tensor per datum of its target shape."""
        values = self.flat if values is None else values
        pieces = values.split(self.lengths)
        if values.dim() == 1:
            return list(pieces)
        return [
            piece[:, : _width(shape)].reshape(shape)
            for piece, shape in zip(pieces, self.target_shapes, strict=True)
        ]

    def stack_per_datum(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of `per_datum`: per-datum tensors of target shape laid out like `flat` (zeros elsewhere)."""
        if self.flat.dim() == 1:
            return torch.cat([v.reshape(-1) for v in values])
        out = torch.zeros(self.flat.shape, dtype=values[0].dtype)
        offset = 0
        for value, length, shape in zip(values, self.lengths, self.target_shapes, strict=True):
            out[offset : offset + length, : _width(shape)] = value.reshape(length, -1)
            offset += length
        return out


def _width(shape: torch.Size) -> int:
    return 1 if len(shape) == 1 else shape[1]


def real_positions(lengths: Sequence[int], longest: int) -> torch.Tensor:
    """int64 (sum(lengths),): the flattened (rows * longest) positions of every row's real tokens, row after row."""
    return torch.cat([row * longest + torch.arange(length) for row, length in enumerate(lengths)])


def target_logprobs(
    model: nn.Module, datums: Sequence[EngineDatum], device: torch.device
) -> MicroBatchLogprobs:
    """log p(target_tokens[i] | input_tokens[:i+1]) for every datum of one micro-batch.

    Runs one padded forward pass; whether a graph is recorded follows the caller's grad mode. Only
    real (unpadded) positions reach the log-softmax, so padding costs no vocabulary-sized work.
    """
    return grouped_target_logprobs(model, datums, device, [len(datums)])[0]


def grouped_target_logprobs(
    model: nn.Module, datums: Sequence[EngineDatum], device: torch.device, group_rows: Sequence[int]
) -> list[MicroBatchLogprobs]:
    """`target_logprobs` of one padded forward pass over `datums`, cut into consecutive groups of rows.

    `group_rows[g]` rows form group g (they must add up to `len(datums)`); each group's logprobs are
    computed from its own rows' logits exactly as if the group were the whole micro-batch (1-D
    targets use the fused cross-entropy kernel, (N, K) targets a gather), so one tenant's target
    shapes never change another's numerics. Real positions are selected by index (no host sync)
    before the logits are upcast, so padded positions are never upcast or log-softmaxed. The caller
    sets the adapter routing: row r's real tokens sit at `real_positions(...)` of the flattened input.
    """
    lengths = [d.input_tokens.shape[0] for d in datums]
    rows, longest = len(datums), max(lengths)
    padded = min(lengths) < longest
    input_ids = torch.zeros(rows, longest, dtype=torch.int64)
    for row, datum in enumerate(datums):
        input_ids[row, : lengths[row]] = datum.input_tokens
    kwargs = {}
    if padded:
        mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        kwargs["attention_mask"] = mask.to(device=device, dtype=torch.int64)
    logits = model(input_ids=input_ids.to(device), use_cache=False, **kwargs).logits
    logits = logits.reshape(rows * longest, -1)
    if padded:
        logits = logits.index_select(0, real_positions(lengths, longest).to(device))
    out = []
    row = token = 0
    for count in group_rows:
        group_lengths = lengths[row : row + count]
        group_tokens = sum(group_lengths)
        group_logits = logits if count == rows else logits[token : token + group_tokens]
        targets = [d.loss_fn_inputs["target_tokens"] for d in datums[row : row + count]]
        out.append(_logprobs(group_logits, targets, group_lengths, device))
        row, token = row + count, token + group_tokens
    return out


def _logprobs(
    logits: torch.Tensor, targets: list[torch.Tensor], lengths: list[int], device: torch.device
) -> MicroBatchLogprobs:
    shapes = [t.shape for t in targets]
    if all(len(shape) == 1 for shape in shapes):
        flat_targets = torch.cat(targets).to(device)
        # the fused kernel the plain training loop uses: logprob = -cross_entropy
        flat = -F.cross_entropy(logits.float(), flat_targets, reduction="none")
    else:
        width = max(_width(shape) for shape in shapes)
        flat_targets = torch.zeros(sum(lengths), width, dtype=torch.int64)
        offset = 0
        for target, length in zip(targets, lengths, strict=True):
            flat_targets[offset : offset + length, : _width(target.shape)] = target.reshape(length, -1)
            offset += length
        logits = logits.float()
        flat = logits.gather(-1, flat_targets.to(device)) - torch.logsumexp(logits, dim=-1, keepdim=True)
    return MicroBatchLogprobs(flat=flat, lengths=lengths, target_shapes=shapes)
