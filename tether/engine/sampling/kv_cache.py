"""Keys and values of a batch of sequences of different lengths, for batched decoding with HF models.

Rows are left-padded to one common length, so every row's real tokens are the rightmost
`row_lengths[r]` columns and a decode step writes the new token of every row into the same column.
A batched prefill of prompts of different lengths starts the same way: each row's prompt is
left-padded to the longest (`start_rows(..., padding=...)`); padding queries attend only to
themselves, so every column holds finite values while no real token ever sees padding.
Buffers have spare capacity that grows geometrically, so a decode step writes in place instead of
copying the whole cache. Rows join (`append_rows`, after their prefill) and leave (`select_rows`,
when they finish) between steps; leaving also trims columns that became padding in every row.

The object is passed to a Hugging Face causal LM as its `cache`: attention layers call
`update(keys, values, layer_idx)` and get back the keys and values to attend to. The attention mask
and position ids that go with it come from `attention_mask` and `position_ids`; the model never has
to ask the cache how long it is.

This module knows nothing about sampling, adapters or requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROWTH_MIN_COLUMNS = 32


class BatchKVCache:
    """Per-layer key and value buffers shaped (rows, kv_heads, capacity, head_dim)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.row_lengths: list[int] = []
        self.length = 0
        """Columns in use (the longest row); columns beyond it are spare capacity."""
        self.max_columns: int | None = None
        """Most columns the current rows can still need, if the owner knows (their remaining token
        budgets): growth and compaction never allocate beyond it, so spare capacity stays small."""
        self._pending = 0
        self._padding: list[int] | None = None
        """Leading columns of each row that the next forward pass fills with padding (a prefill)."""

    @property
    def num_rows(self) -> int:
        return len(self.row_lengths)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def num_token_slots(self) -> int:
        """Token positions held per layer, padding and spare capacity included (memory accounting)."""
        return self.num_rows * self.capacity

    # --- the Hugging Face cache protocol -------------------------------------------------------
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values of layer `layer_idx` and return everything to attend to."""
        new_columns = key_states.shape[2]
        if layer_idx == len(self.keys):
            capacity = max(self.length + new_columns, GROWTH_MIN_COLUMNS)
            self.keys.append(self._empty_like(key_states, capacity))
            self.values.append(self._empty_like(value_states, capacity))
        elif self.length + new_columns > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, self.length + new_columns)
        end = self.length + new_columns
        self.keys[layer_idx][:, :, self.length : end] = key_states
        self.values[layer_idx][:, :, self.length : end] = value_states
        self._pending = new_columns
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    # --- driving a step --------------------------------------------------------------------------
    def attention_mask(
        self, num_new: int, device: torch.device | str, sliding_window: int | None = None
    ) -> torch.Tensor:
        """Boolean (rows, 1, num_new, length + num_new) mask: True where a query may attend.

        A query sees its own row's real tokens before it and itself (causal among the new tokens);
        with `sliding_window` w, only the last w of them (Hugging Face's `kv > q - w`). A padding
        query of a padded prefill sees only itself.
        """
        total = self.length + num_new
        columns = torch.arange(total, device=device)[None, None, :]
        lengths = torch.tensor(self.row_lengths, device=device, dtype=torch.long)
        first_real = (self.length - lengths + self._padding_tensor(device))[:, None, None]
        query_column = (self.length + torch.arange(num_new, device=device))[None, :, None]
        mask = (columns >= first_real) & (columns <= query_column)
        if sliding_window is not None:
            mask &= columns > query_column - sliding_window  # a row's columns are its positions, shifted
        if self._padding is not None:
            mask |= columns == query_column  # padding queries attend to themselves: finite, never seen
        return mask[:, None]

    def position_ids(self, num_new: int, device: torch.device | str) -> torch.Tensor:
        """(rows, num_new) positions of the new tokens: each row continues from its own length
        (padding columns of a padded prefill get position 0)."""
        lengths = torch.tensor(self.row_lengths, device=device, dtype=torch.long)
        positions = lengths[:, None] + torch.arange(num_new, device=device)[None, :]
        if self._padding is None:
            return positions
        padding = torch.tensor(self._padding, device=device, dtype=torch.long)
        return (positions - padding[:, None]).clamp(min=0)

    def commit(self) -> None:
        """Account for the tokens written by the forward pass that just ran."""
        padding = self._padding or [0] * self.num_rows
        self.length += self._pending
        self.row_lengths = [n + self._pending - p for n, p in zip(self.row_lengths, padding, strict=True)]
        self._pending = 0
        self._padding = None

    def discard(self) -> None:
        """Forget a forward pass that failed half-way (its columns are beyond `length`)."""
        self._pending = 0

    # --- rows joining and leaving ---------------------------------------------------------------
    def start_rows(self, num_rows: int, padding: Sequence[int] | None = None) -> None:
        """Prepare an empty cache for a prefill of `num_rows` rows.

        `padding[r]`: how many leading columns of row r the prefill fills with padding (its prompt
        is that much shorter than the longest); None = rows of equal length.
        """
        if self.keys:
            raise ValueError("start_rows is for an empty cache")
        if padding is not None and (len(padding) != num_rows or min(padding, default=0) < 0):
            raise ValueError(f"padding needs {num_rows} counts >= 0, got {list(padding)}")
        self.row_lengths = [0] * num_rows
        self._padding = list(padding) if padding is not None and any(padding) else None

    def append_rows(self, joining: Sequence[tuple[BatchKVCache, int | Sequence[int]]]) -> None:
        """Add the rows of each `(cache, repeats)` pair, padding on the left as needed: each row
        `repeats` times (samples sharing one prefill), or row r `repeats[r]` times (0 = left out).
        One reallocation however many caches join."""
        counted = [
            (other, [repeats] * other.num_rows if isinstance(repeats, int) else list(repeats))
            for other, repeats in joining
        ]
        for other, counts in counted:
            if len(counts) != other.num_rows:
                raise ValueError(f"{len(counts)} repeat counts for {other.num_rows} rows")
        counted = [(other, counts) for other, counts in counted if sum(counts)]
        if not counted:
            return
        # Columns each joining cache brings: its joining rows' longest, not padding only left-out rows need.
        used = {
            id(other): max(n for n, k in zip(other.row_lengths, counts, strict=True) if k)
            for other, counts in counted
        }
        new_length = max(self.length, *used.values())
        rows = self.num_rows + sum(sum(counts) for _, counts in counted)
        capacity = max(new_length + GROWTH_MIN_COLUMNS, self.capacity)
        template = counted[0][0]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in range(len(template.keys)):
            for merged, mine, attr in ((keys, self.keys, "keys"), (values, self.values, "values")):
                target = self._empty_like(getattr(template, attr)[layer], capacity, rows)
                row = 0
                if mine:
                    self._copy_right_aligned(target[: self.num_rows], mine[layer], self.length, new_length)
                    row = self.num_rows
                for other, counts in counted:
                    width = used[id(other)]
                    source = getattr(other, attr)[layer][:, :, other.length - width : other.length]
                    if counts != [1] * other.num_rows:
                        source = source.index_select(0, _repeat_index(counts, source.device))
                    count = source.shape[0]
                    self._copy_right_aligned(target[row : row + count], source, width, new_length)
                    row += count
                merged.append(target)
        self.keys, self.values = keys, values
        self.row_lengths = self.row_lengths + [
            n
            for other, counts in counted
            for n, k in zip(other.row_lengths, counts, strict=True)
            for _ in range(k)
        ]
        self.length = new_length

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order) and drop columns that are padding in all of them."""
        if not rows:
            self.keys, self.values, self.row_lengths, self.length = [], [], [], 0
            return
        lengths = [self.row_lengths[r] for r in rows]
        new_length = max(lengths)
        drop = self.length - new_length
        index = torch.tensor(list(rows), dtype=torch.long, device=self.keys[0].device)
        spare = self.capacity - self.length
        capacity = self._capped(new_length + max(spare, GROWTH_MIN_COLUMNS), new_length)
        for layer in range(len(self.keys)):
            for buffers in (self.keys, self.values):
                kept = buffers[layer][:, :, drop : self.length].index_select(0, index)
                fresh = self._empty_like(kept, capacity)
                fresh[:, :, :new_length] = kept
                buffers[layer] = fresh
        self.row_lengths = lengths
        self.length = new_length

    def copy_row(self, row: int) -> BatchKVCache:
        """A new one-row cache holding a copy of `row`'s real tokens only (no padding, no spare)."""
        copy = BatchKVCache()
        length = self.row_lengths[row]
        for source, target in ((self.keys, copy.keys), (self.values, copy.values)):
            for layer in source:
                target.append(layer[row : row + 1, :, self.length - length : self.length].clone())
        copy.row_lengths = [length]
        copy.length = length
        return copy

    # --- helpers --------------------------------------------------------------------------------
    def _grow(self, layer_idx: int, needed: int) -> None:
        capacity = self._capped(max(needed, 2 * self.keys[layer_idx].shape[2]), needed)
        for buffers in (self.keys, self.values):
            old = buffers[layer_idx]
            fresh = self._empty_like(old, capacity)
            fresh[:, :, : self.length] = old[:, :, : self.length]
            buffers[layer_idx] = fresh

    def _padding_tensor(self, device: torch.device | str) -> torch.Tensor | int:
        if self._padding is None:
            return 0
        return torch.tensor(self._padding, device=device, dtype=torch.long)

    def _capped(self, capacity: int, needed: int) -> int:
        return capacity if self.max_columns is None else max(needed, min(capacity, self.max_columns))

    @staticmethod
    def _empty_like(like: torch.Tensor, capacity: int, rows: int | None = None) -> torch.Tensor:
        shape = (like.shape[0] if rows is None else rows, like.shape[1], capacity, like.shape[3])
        # Uninitialised: columns at or beyond `length` are never attended to (views stop there), and
        # every left-padding column below it is zeroed by `_copy_right_aligned`.
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    @staticmethod
    def _copy_right_aligned(
        target: torch.Tensor, source: torch.Tensor, source_length: int, length: int
    ) -> None:
        # Padding is masked out but must be finite: NaN there would leak through 0 * NaN in attention.
        target[:, :, : length - source_length] = 0
        target[:, :, length - source_length : length] = source[:, :, :source_length]


def _repeat_index(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row indices that repeat row r `counts[r]` times, in order."""
    rows = torch.arange(len(counts), device=device)
    return rows.repeat_interleave(torch.tensor(list(counts), device=device, dtype=torch.long))
