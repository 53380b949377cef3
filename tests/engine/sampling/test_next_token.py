"""Token choice per row: greedy, top-k, top-p, temperature and seeded draws, against plain PyTorch."""

from __future__ import annotations

import torch

from tether.engine.sampling.next_token import RowSampling, choose_tokens, make_generator, untempered_logprobs


def draws(logits_row: torch.Tensor, row: RowSampling, n: int, seed: int = 0) -> torch.Tensor:
    generator = make_generator(seed, 0, 0)
    logits = logits_row[None, :].expand(n, -1)
    return choose_tokens(logits, [row] * n, [generator] * n)


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    generator = make_generator(1, 0, 0)
    before = generator.get_state()
    tokens = choose_tokens(logits, [RowSampling(0.0)] * 3, [generator] * 3)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert torch.equal(generator.get_state(), before)


def test_untempered_logprobs_are_log_softmax_of_raw_logits():
    logits = torch.randn(2, 7)
    assert torch.allclose(untempered_logprobs(logits), logits - logits.logsumexp(-1, keepdim=True), atol=1e-6)


def test_sampling_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    tokens = draws(logits, RowSampling(temperature=2.0), n)
    frequencies = torch.bincount(tokens, minlength=4).float() / n
    expected = torch.softmax(logits / 2.0, -1)
    assert (frequencies - expected).abs().max() < 0.03


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    tokens = draws(logits, RowSampling(temperature=5.0, top_k=2), 500)
    assert set(tokens.tolist()) == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    tokens = draws(logits, RowSampling(temperature=1.0, top_p=0.75), 1000)
    assert set(tokens.tolist()) == {0, 1}
    frequencies = torch.bincount(tokens, minlength=4).float() / 1000
    assert abs(frequencies[0].item() - 0.5 / 0.8) < 0.05
    tiny = draws(logits, RowSampling(temperature=1.0, top_p=0.01), 50)
    assert set(tiny.tolist()) == {0}


def test_rows_with_their_own_seed_draw_the_same_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    rows = [
        RowSampling(1.0),
        RowSampling(0.0),
        RowSampling(0.7, top_k=10),
        RowSampling(1.0, top_p=0.9),
        RowSampling(1.3),
    ]

    def run(order: list[int]) -> dict[int, list[int]]:
        generators = {i: make_generator(100 + i, 0, 0) for i in order}
        picked: dict[int, list[int]] = {i: [] for i in order}
        for _ in range(20):
            tokens = choose_tokens(logits[order], [rows[i] for i in order], [generators[i] for i in order])
            for i, token in zip(order, tokens.tolist(), strict=True):
                picked[i].append(token)
        return picked

    together = run([0, 1, 2, 3, 4])
    alone = run([3])
    reordered = run([4, 3, 0])
    assert together[3] == alone[3] == reordered[3]
    assert together[0] == reordered[0]
    assert together[0] != together[4]


def test_samples_of_one_seed_get_distinct_streams():
    first = make_generator(42, 0, 0)
    second = make_generator(42, 1, 0)
    assert torch.rand(4, generator=first).tolist() != torch.rand(4, generator=second).tolist()
    assert torch.rand(4, generator=make_generator(-3, 0, 0)).shape == (4,)


def test_filtering_that_keeps_everything_samples_the_same_distribution():
    logits = torch.tensor([1.5, 0.5, 0.0, -0.5, -2.0])
    n = 4000
    plain = torch.bincount(draws(logits, RowSampling(1.0), n, seed=1), minlength=5).float() / n
    no_op = torch.bincount(draws(logits, RowSampling(1.0, top_p=0.9999), n, seed=2), minlength=5).float() / n
    expected = torch.softmax(logits, -1)
    assert (plain - expected).abs().max() < 0.03
    assert (no_op - expected).abs().max() < 0.03


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")])
    assert set(draws(logits, RowSampling(1.0), 300).tolist()) == {0, 2}
    assert set(draws(logits, RowSampling(1.0, top_p=0.99), 300).tolist()) == {0, 2}
