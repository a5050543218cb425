"""Batched sampling (issue 16): ``sample_batch`` of every built-in sampler equals per-row
``sample`` calls with identically seeded generators, step after step; a sampler that implements
only ``sample`` works through the default loop; the torch nucleus cutoff is bit for bit
ChatRWKV's numpy one; ``Penalties.apply_batch`` equals per-row ``apply``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkvkit.errors import InputError
from rwkvkit.interfaces import SampleContext, Sampler
from rwkvkit.penalties import Penalties
from rwkvkit.plugins import samplers
from rwkvkit.plugins.samplers import nucleus_keep, row_sum, sharpen

OPTIONS = {
    "nucleus": [
        {},
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 1.3, "top_p": 0.5, "top_k": 40},
        {"top_p": 1.0},
        {"top_p": 0.0, "temperature": 2.0},
        {"temperature": 0},
        {"temperature": 0.005, "top_p": 0.999},  # sharpen's log-space weights
    ],
    "greedy": [{}],
    "min_p": [{}, {"min_p": 0.2, "temperature": 0.8}, {"min_p": 0.0, "temperature": 1e-3}, {"temperature": 0}],
    "typical": [{}, {"typical_p": 0.5, "temperature": 1.2}, {"temperature": 0}],
}
CASES = [(name, options) for name, table in OPTIONS.items() for options in table]


def builtin_samplers() -> dict[str, type]:
    table: dict[str, type] = {}
    samplers.register_samplers(lambda factory, name=None: table.setdefault(name or factory.name, factory))
    return table


def mixed_logits(batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of different shapes in one batch: peaked, flat, integer-valued (exact ties, also at
    the cutoff) and peaked with banned (-inf) tokens."""
    rows = []
    for i in range(batch):
        kind = i % 4
        row = torch.randn(vocab, generator=gen) * (4.0 if kind in (0, 3) else 0.3)
        if kind == 2:
            row = torch.randint(-3, 3, (vocab,), generator=gen).float()
        if kind == 3:
            row[torch.randperm(vocab, generator=gen)[: vocab // 3]] = -float("inf")
        rows.append(row)
    return torch.stack(rows)


def contexts(seeds: range) -> list[SampleContext]:
    return [SampleContext(torch.Generator().manual_seed(seed)) for seed in seeds]


def assert_same_draws(sampler: Sampler, batch: int, vocab: int, steps: int) -> None:
    """``steps`` batched draws against the same draws one row at a time, then equal generators."""
    batched, alone = contexts(range(100, 100 + batch)), contexts(range(100, 100 + batch))
    gen = torch.Generator().manual_seed(vocab + batch)
    for step in range(steps):
        logits = mixed_logits(batch, vocab, gen)
        got = sampler.sample_batch(logits, batched)
        expected = [sampler.sample(logits[i].clone(), alone[i]) for i in range(batch)]
        assert got == expected, f"step {step}"
    for b, a in zip(batched, alone):
        assert torch.equal(b.generator.get_state(), a.generator.get_state())


def test_every_builtin_sampler_has_cases():
    assert set(OPTIONS) == set(builtin_samplers())


@pytest.mark.parametrize("name, options", CASES)
def test_sample_batch_equals_separate_samples(name, options):
    assert_same_draws(builtin_samplers()[name](**options), batch=7, vocab=3000, steps=15)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cpu_passes_of_a_few_rows_change_no_token(name, monkeypatch):
    monkeypatch.setattr(samplers, "CPU_PASS_BYTES", 8 * 3000 * 3)  # passes of 3, 3 and 1 rows
    assert_same_draws(builtin_samplers()[name](), batch=7, vocab=3000, steps=6)


def test_passes_of_rows_that_share_a_generator_draw_in_row_order(monkeypatch):
    """CPU passes run side by side, but rows drawing from one generator must draw in row order:
    then the passes run one after another, and the tokens are the rows sampled one by one."""
    monkeypatch.setattr(samplers, "CPU_PASS_BYTES", 8 * 3000 * 2)  # passes of 2 rows
    sampler, logits = builtin_samplers()["nucleus"](top_p=1.0), mixed_logits(8, 3000, torch.Generator().manual_seed(5))
    shared, alone = SampleContext(torch.Generator().manual_seed(9)), SampleContext(torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = sampler.sample_batch(logits, [shared] * 8)
    finally:
        torch.set_num_threads(threads)
    assert got == [sampler.sample(row.clone(), alone) for row in logits]


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_sample_batch_equals_separate_samples_at_the_world_vocabulary(name):
    """65,536 tokens on two threads: a lone row's reductions split across threads (sum() would
    give other bits than the same row in a batch), and the nucleus prefix grows to the full sort."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_same_draws(builtin_samplers()[name](), batch=6, vocab=65536, steps=2)  # passes of 4 and 2 rows
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name, options", CASES)
def test_an_empty_batch_draws_nothing(name, options):
    assert builtin_samplers()[name](**options).sample_batch(torch.zeros(0, 50), []) == []


def test_a_sequence_draws_the_same_tokens_in_any_batch():
    """The same seeded sequence, alone and between others that come and go."""
    sampler = samplers.NucleusSampler(temperature=0.9, top_p=0.9)
    gen = torch.Generator().manual_seed(5)
    steps = [mixed_logits(5, 2000, gen) for _ in range(12)]
    alone, mine = contexts(range(9, 10)), contexts(range(9, 10))
    expected = [sampler.sample_batch(logits[:1], alone)[0] for logits in steps]
    got = []
    for i, logits in enumerate(steps):
        others = contexts(range(20 + i, 20 + i + i % 5))
        got.append(sampler.sample_batch(logits[: 1 + len(others)], mine + others)[0])
    assert got == expected


def test_row_sum_is_the_same_for_a_row_alone_and_in_a_batch():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(8, 65536, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        batched = row_sum(x)
        assert all(torch.equal(batched[i], row_sum(x[i : i + 1])[0]) for i in range(8))
    finally:
        torch.set_num_threads(threads)


class OnlySample(Sampler):
    """A third-party sampler written before the batched form: it implements ``sample`` only."""

    name = "only_sample"

    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int:
        return int(torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=ctx.generator))


def test_a_sampler_without_sample_batch_works_through_the_default_loop():
    assert "sample_batch" not in OnlySample.__dict__
    assert_same_draws(OnlySample(), batch=5, vocab=500, steps=10)


@pytest.mark.parametrize("sampler", [OnlySample(), samplers.NucleusSampler(), samplers.GreedySampler(), samplers.TypicalSampler()])
@pytest.mark.parametrize(
    "logits, n_ctx, message",
    [
        (torch.zeros(10), 1, r"float logits \[B, V\], got torch.float32 \[10\]"),
        (torch.zeros(2, 10, dtype=torch.long), 2, r"got torch.int64 \[2, 10\]"),
        ([[0.0, 1.0]], 1, r"got list"),
        (torch.zeros(3, 10), 2, r"3 rows of logits for 2 sample contexts"),
    ],
)
def test_bad_sample_batch_input(sampler, logits, n_ctx, message):
    with pytest.raises(InputError, match=message):
        sampler.sample_batch(logits, contexts(range(n_ctx)))


# -- the nucleus cutoff against ChatRWKV's numpy code --------------------------------------------


def chatrwkv_keep(probs: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """ChatRWKV's CPU cutoff (its float32 ``np.cumsum``), as rwkvkit ran it before the batched
    form: every token stays where the sum never reaches ``top_p``, and ties at the top_k-th
    place keep the lowest ids (a stable argsort) instead of numpy's unspecified order."""
    kept = probs.copy()
    sorted_probs = np.sort(probs)[::-1]
    reached = np.cumsum(sorted_probs) >= top_p
    cutoff = float(sorted_probs[np.argmax(reached)]) if reached.any() else 0.0
    kept[probs < cutoff] = 0
    if 0 < top_k < len(probs):
        kept[np.argsort(-probs, kind="stable")[top_k:]] = 0
    return kept


def nucleus_rows(gen: torch.Generator) -> list[torch.Tensor]:
    """Softmax rows: peaked, flat (the prefix grows past 64 and 1,024), exact ties (also at the
    cutoff and at the top_k-th place), banned tokens, one token, two equal ones."""
    rows = [torch.randn(5000, generator=gen) * scale for scale in (0.05, 0.3, 1.0, 3.0, 8.0, 30.0)]
    rows += [torch.randint(-4, 4, (5000,), generator=gen).float() * step for step in (0.5, 1.0, 2.0)]
    rows += [torch.zeros(5000), torch.tensor([0.0]), torch.tensor([1.0, 1.0]), torch.randn(7, generator=gen)]
    banned = torch.randn(5000, generator=gen) * 2
    banned[::3] = -float("inf")
    rows.append(banned)
    return [torch.softmax(row, 0) for row in rows]


@pytest.mark.parametrize("top_p", [0.0, 1e-4, 0.3, 0.85, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 7, 100])
def test_nucleus_keep_is_bit_identical_to_chatrwkvs_numpy_cutoff(top_p, top_k):
    for probs in nucleus_rows(torch.Generator().manual_seed(11)):
        expected = chatrwkv_keep(probs.numpy(), top_p, top_k)
        got = nucleus_keep(probs[None], top_p, top_k)[0].numpy()
        assert np.array_equal(got, expected), (top_p, top_k, len(probs))


def test_nucleus_keep_batched_rows_equal_rows_alone():
    """Rows that stop at different prefix widths in one batch (peaked: 64; flat: the whole row)."""
    scales = torch.tensor([[8.0], [0.1], [3.0], [0.0], [1.0], [30.0]])
    probs = torch.softmax(torch.randn(6, 65536, generator=torch.Generator().manual_seed(3)) * scales, -1)
    for top_p, top_k in [(0.85, 0), (0.999, 0), (1.0, 50), (0.0, 0)]:
        batched = nucleus_keep(probs, top_p, top_k)
        for i, row in enumerate(probs):
            assert torch.equal(batched[i], nucleus_keep(row[None], top_p, top_k)[0])
            assert np.array_equal(batched[i].numpy(), chatrwkv_keep(row.numpy(), top_p, top_k))


def test_top_k_ties_keep_the_lowest_ids():
    probs = torch.tensor([[0.1, 0.3, 0.1, 0.3, 0.1, 0.1]])
    assert nucleus_keep(probs, 1.0, 3)[0].tolist() == pytest.approx([0.1, 0.3, 0.0, 0.3, 0.0, 0.0])
    assert nucleus_keep(probs, 1.0, 1)[0].tolist() == pytest.approx([0.0, 0.3, 0.0, 0.0, 0.0, 0.0])


def test_sharpen_rows_alone_and_batched():
    """One row underflows at T = 0.01 (log space), the other does not (the plain power)."""
    kept = torch.tensor([[0.0, 1e-5, 2e-5, 4e-5], [0.0, 0.05, 0.9, 0.05]], dtype=torch.float64)
    batched = sharpen(kept, 1e-2)
    for i in range(2):
        assert torch.equal(batched[i], sharpen(kept[i], 1e-2))
    assert torch.equal(batched[1], kept[1] ** 100.0) and batched[0, 3] == 1


# -- penalties ----------------------------------------------------------------------------------


def reference_apply(p: Penalties, logits: torch.Tensor) -> torch.Tensor:
    """``Penalties.apply`` as it was before the batched form (per token, Python floats)."""
    out = logits.clone()
    if p.ban:
        out[list(p.ban)] = -float("inf")
    if p.counts:
        amounts = [p.presence + c * p.frequency for c in p.counts.values()]
        out[torch.tensor(list(p.counts))] -= torch.tensor(amounts, dtype=torch.float64).to(out.dtype)
    return out


def penalties_rows(vocab: int, gen: torch.Generator) -> list[Penalties]:
    rows = [Penalties(), Penalties(presence=0.4, frequency=0.3, decay=0.996, ban=[0, 5]), Penalties(ban=[vocab - 1])]
    rows += [Penalties(presence=0.1 * i, frequency=0.37 * i, decay=0.9 + 0.02 * i, ban=[7] if i % 2 else []) for i in range(1, 5)]
    texts = ["cat", " ", "12", "", "dog\n"]
    for p in rows:
        for _ in range(int(torch.randint(0, 60, (), generator=gen))):
            p.update(int(torch.randint(0, vocab, (), generator=gen)), texts[int(torch.randint(0, 5, (), generator=gen))])
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_apply_batch_equals_apply_per_row(dtype):
    gen = torch.Generator().manual_seed(4)
    rows = penalties_rows(300, gen)
    logits = (torch.randn(len(rows), 300, generator=gen) * 3).to(dtype)
    before = logits.clone()
    out = Penalties.apply_batch(logits, rows)
    assert torch.equal(logits, before)  # input untouched
    for i, p in enumerate(rows):
        assert torch.equal(out[i], p.apply(logits[i]))
        assert torch.equal(out[i], reference_apply(p, logits[i]))


def test_counts_equal_chatrwkvs_dict_bit_for_bit():
    """The array-backed counts get ChatRWKV's per-token loop exactly (written here as it was:
    every count times the decay, then the new occurrence), past several array growths."""
    gen = torch.Generator().manual_seed(5)
    for decay in (0.996, 0.5, 1.0, 0.0):
        p, reference = Penalties(presence=0.3, frequency=0.2, decay=decay), {}
        for _ in range(400):
            token, text = int(torch.randint(0, 150, (), generator=gen)), ["a", " ", "7"][int(torch.randint(0, 3, (), generator=gen))]
            p.update(token, text)
            for t in reference:
                reference[t] *= decay
            reference[token] = reference.get(token, 0.0) + (0.0 if text in " \t0123456789" else 1.0)
        assert list(p.counts) == list(reference) and dict(p.counts) == reference  # same order, same floats
        assert len(reference) > 64  # grew its arrays a few times


def test_counts_given_at_construction_are_checked():
    assert dict(Penalties(counts={3: 2.0, 1: 0.5}).counts) == {3: 2.0, 1: 0.5}
    with pytest.raises(InputError, match=r"counts=\[1, 2\]: expected a mapping"):
        Penalties(counts=[1, 2])
    with pytest.raises(InputError, match=r"entries \[\('a', 1.0\), \(2, nan\)\]"):
        Penalties(counts={"a": 1.0, 2: float("nan"), 3: 1})


def test_apply_batch_of_no_rows_and_of_rows_without_penalties():
    assert Penalties.apply_batch(torch.zeros(0, 5), []).shape == (0, 5)
    logits = torch.randn(3, 5)
    assert torch.equal(Penalties.apply_batch(logits, [Penalties()] * 3), logits)


@pytest.mark.parametrize(
    "logits, rows, message",
    [
        (torch.zeros(5), [Penalties()], r"logits \[B, V\] and B penalties, got \[5\] and 1"),
        (torch.zeros(2, 5), [Penalties()], r"got \[2, 5\] and 1"),
        (torch.zeros(1, 5), [Penalties(ban=[5])], r"id\(s\) \[5\] outside the vocabulary 0..4"),
        (torch.zeros(1, 5), [Penalties(counts={-1: 1.0})], r"id\(s\) \[-1\] outside"),
    ],
)
def test_bad_apply_batch_input(logits, rows, message):
    with pytest.raises(InputError, match=message):
        Penalties.apply_batch(logits, rows)
