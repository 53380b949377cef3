"""Batched decoding over the left-padded cache equals a plain full forward of each sequence alone."""

from __future__ import annotations

import torch

from tether.engine.sampling.kv_cache import BatchKVCache
from tether.engine.sampling.model_runner import decode, prefill


def reference_next_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def test_rows_joining_and_leaving_decode_exactly(base):
    model = base.model
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (5, 17, 2)]
    group = BatchKVCache()
    sequences: list[list[int]] = []
    for prompt in prompts[:2]:
        out = prefill(model, None, prompt)
        group.append_rows([(out.cache, 1)])
        sequences.append(prompt + [int(out.last_logits.argmax())])
    for step in range(40):  # long enough to grow the buffers past their first capacity
        if step == 3:  # a prompt joins twice (two samples sharing its prefill)
            out = prefill(model, None, prompts[2])
            group.append_rows([(out.cache, 2)])
            first = int(out.last_logits.argmax())
            sequences += [prompts[2] + [first], prompts[2] + [first]]
        if step == 6:  # the long prompt leaves; its padding columns are trimmed away
            group.select_rows([0, 2, 3])
            sequences = [sequences[0], sequences[2], sequences[3]]
            assert group.length == max(group.row_lengths)
        logits = decode(model, group, [s[-1] for s in sequences], [None] * len(sequences))
        for row, sequence in enumerate(sequences):
            if step < 8 or step % 8 == 7:  # every step around joins and leaves, then now and then
                expected = reference_next_logits(model, sequence)
                assert torch.allclose(logits[row], expected, atol=1e-4), (step, row)
            sequence.append(int(logits[row].argmax()))
    assert group.capacity >= group.length == max(len(s) for s in sequences) - 1


def test_select_no_rows_empties_the_cache(base):
    out = prefill(base.model, None, [1, 2, 3])
    out.cache.select_rows([])
    assert out.cache.num_rows == 0 and out.cache.length == 0


def test_failed_forward_leaves_the_cache_as_it_was(base):
    out = prefill(base.model, None, [1, 2, 3])
    cache = out.cache
    before = (cache.length, list(cache.row_lengths))
    try:
        decode(base.model, cache, [10_000], [None])  # out of range embedding index
    except IndexError:
        pass
    assert (cache.length, cache.row_lengths) == before


def test_growth_keeps_every_written_column_and_never_exceeds_what_the_rows_can_still_need():
    generator = torch.Generator().manual_seed(0)
    written = torch.randn(2, 1, 75, 4, generator=generator)

    def grown(cap: bool) -> BatchKVCache:
        cache = BatchKVCache()
        cache.start_rows(2)
        for start, end in [(0, 40), *((n, n + 1) for n in range(40, 75))]:  # a prefill, then 35 decodes
            if start == 40:
                cache.max_columns = 75 if cap else None
            keys, values = cache.update(written[:, :, start:end], -written[:, :, start:end], 0)
            assert torch.equal(keys, written[:, :, :end]) and torch.equal(values, -written[:, :, :end])
            cache.commit()
        return cache

    assert grown(cap=False).capacity == 2 * 40  # outgrew the 40-column buffer: doubled
    capped = grown(cap=True)
    assert capped.length == 75 and capped.capacity == 75  # grew only to what the rows can still need
