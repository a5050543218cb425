"""Samplers: ChatRWKV's nucleus cutoff exactly, sampling frequencies, min-p, typical, penalties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkvkit.errors import InputError
from rwkvkit.interfaces import SampleContext
from rwkvkit.penalties import Penalties
from rwkvkit.plugins import samplers
from rwkvkit.plugins.samplers import GreedySampler, MinPSampler, NucleusSampler, TypicalSampler, nucleus_probs


def chatrwkv_distribution(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, monkeypatch) -> np.ndarray:
    """The probabilities ChatRWKV's own ``sample_logits`` hands to ``np.random.choice``."""
    from rwkv.utils import PIPELINE  # utils has no import-time side effects (rwkv.model does)

    seen = {}

    def choice(a, p):
        seen["p"] = np.array(p, dtype=np.float64)
        return 0

    monkeypatch.setattr(np.random, "choice", choice)
    PIPELINE.sample_logits(None, logits.clone(), temperature=temperature, top_p=top_p, top_k=top_k)
    return seen["p"]


def our_distribution(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, monkeypatch) -> np.ndarray:
    """The normalised weights NucleusSampler hands to its draw."""
    seen = {}

    def draw(weights, ctxs):
        seen["p"] = (weights[0] / weights[0].sum()).numpy()
        return [0]

    monkeypatch.setattr(samplers, "_draw", draw)
    NucleusSampler(temperature, top_p, top_k).sample(logits, SampleContext(torch.Generator()))
    return seen["p"]


def tied_at_top_k(logits: torch.Tensor, top_p: float, top_k: int) -> bool:
    """More than ``top_k`` tokens pass the top-p cutoff and the ``top_k``-th ties the next one
    (rwkvkit keeps the lowest ids of such a tie: tests/test_samplers_batch.py)."""
    probs = torch.softmax(logits, 0).numpy()
    ranked = np.sort(probs)[::-1]
    passing = int((nucleus_probs(probs, top_p, 0) > 0).sum())
    return 0 < top_k < passing and ranked[top_k - 1] == ranked[top_k]


def logits_grid():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(1000, generator=g) * 3
    yield torch.randn(50, generator=g)
    yield (torch.randn(200, generator=g) * 2).round()  # many exact ties at the cutoff


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.7, 0.85, 0.95, 0.999])
@pytest.mark.parametrize("top_k", [0, 1, 5, 100])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_nucleus_allowed_set_and_distribution_equal_chatrwkv(monkeypatch, case, top_p, top_k, temperature):
    logits = list(logits_grid())[case]
    if tied_at_top_k(logits, top_p, top_k):
        pytest.skip("which tokens tied at the top_k-th place stay is numpy's unstable argsort order in ChatRWKV")
    theirs = chatrwkv_distribution(logits, temperature, top_p, top_k, monkeypatch)
    monkeypatch.undo()
    ours = our_distribution(logits, temperature, top_p, top_k, monkeypatch)
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)  # ChatRWKV normalises in float32


def test_top_p_one_keeps_every_token_where_chatrwkv_degenerates_to_greedy(monkeypatch):
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    ours = our_distribution(logits, 1.0, 1.0, 0, monkeypatch)
    assert (ours > 0).all()


def test_temperature_zero_is_greedy():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(2))
    ctx = SampleContext(torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    for sampler in (NucleusSampler(temperature=0), NucleusSampler(top_p=0), MinPSampler(temperature=0), TypicalSampler(temperature=0), GreedySampler()):
        assert all(sampler.sample(logits, ctx) == best for _ in range(20))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0, "sampled a token with zero probability"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


def test_sampling_frequencies_match_the_distribution():
    """20,000 seeded draws; chi-square against the expected probabilities after the cutoff and
    temperature. With k-1 <= 7 degrees of freedom the 0.1% critical value is 24.3: a wrong
    temperature or cutoff gives values in the thousands. The seed is fixed, so this cannot flake."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    sampler = NucleusSampler(temperature=0.7, top_p=0.9, top_k=0)
    ctx = SampleContext(torch.Generator().manual_seed(123))
    counts = np.bincount([sampler.sample(logits, ctx) for _ in range(20000)], minlength=8)
    probs = torch.softmax(logits, 0).numpy()
    kept = nucleus_probs(probs, 0.9, 0) ** (1 / 0.7)
    assert chi_square(counts, kept / kept.sum()) < 24.3


@pytest.mark.parametrize("u, token", [(0.0, 1), (0.25 - 1e-12, 1), (0.25, 3), (float(np.nextafter(1.0, 0.0)), 3)])
def test_a_draw_lands_on_its_weight_and_never_on_a_zero_weight(monkeypatch, u, token):
    """The extreme uniforms 0 and the largest double below 1 land on the first and last tokens
    with weight; [0, 1, 0, 3, 0] splits at u = 1/4."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([u], dtype=torch.float64))
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    assert samplers._draw(weights, [SampleContext(torch.Generator())]) == [token]


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_a_row_with_nothing_to_draw_is_refused(bad):
    weights = torch.tensor([[0.0, 1.0], [0.0, bad]], dtype=torch.float64)
    with pytest.raises(ValueError, match="invalid distribution"):
        samplers._draw(weights, [SampleContext(torch.Generator()) for _ in range(2)])


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(3))

    def draw(seed):
        ctx = SampleContext(torch.Generator().manual_seed(seed))
        return [NucleusSampler(top_p=0.95).sample(logits, ctx) for _ in range(50)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_min_p_only_draws_allowed_tokens():
    logits = torch.tensor([3.0, 2.9, 1.0, 0.0, -5.0])
    probs = torch.softmax(logits, 0)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    ctx = SampleContext(torch.Generator().manual_seed(0))
    drawn = {MinPSampler(min_p=0.2).sample(logits, ctx) for _ in range(300)}
    assert drawn == allowed == {0, 1}


@pytest.mark.parametrize("typical_p, expected", [(0.2, {1}), (0.5, {0, 1}), (0.9, {0, 1, 2})])
def test_typical_keeps_tokens_nearest_the_entropy(typical_p, expected):
    """probs (0.5, 0.3, 0.2): entropy 1.030 nats; surprisals 0.693, 1.204, 1.609 are 0.337, 0.174,
    0.580 away from it, so tokens enter in the order 1, 0, 2 (cumulative 0.3, 0.8, 1.0)."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    ctx = SampleContext(torch.Generator().manual_seed(0))
    assert {TypicalSampler(typical_p=typical_p).sample(logits, ctx) for _ in range(200)} == expected


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NucleusSampler(top_p=2), "top_p=2"),
        (lambda: NucleusSampler(top_p=-0.1), "top_p=-0.1"),
        (lambda: NucleusSampler(temperature=-1), "temperature=-1"),
        (lambda: NucleusSampler(top_k=-3), "top_k=-3"),
        (lambda: NucleusSampler(temperature="hot"), "temperature='hot'"),
        (lambda: MinPSampler(min_p=1.5), "min_p=1.5"),
        (lambda: TypicalSampler(typical_p=-1), "typical_p=-1"),
    ],
)
def test_bad_sampler_options(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_penalties_follow_chatrwkv():
    p = Penalties(presence=0.25, frequency=0.5, decay=0.5, ban=[0])
    logits = torch.zeros(6)
    p.update(3, "cat")
    p.update(3, "cat")  # 1 * 0.5 + 1 = 1.5
    p.update(4, " ")  # whitespace: presence only, weight 0
    p.update(5, "12")  # a substring of ChatRWKV's digit string: weight 0 as well
    out = p.apply(logits)
    assert out[0] == -float("inf")
    assert out[3] == pytest.approx(-(0.25 + 0.5 * 1.5 * 0.25))  # decayed twice more after its last update
    assert out[4] == pytest.approx(-0.25) and out[5] == pytest.approx(-0.25)
    assert out[1] == 0 and torch.equal(logits, torch.zeros(6))  # input untouched


def test_bad_ban_list():
    with pytest.raises(InputError, match=r"token_ban has id\(s\) \[70000\]"):
        Penalties(ban=[1, 70000]).check(65536)


def numpy_cutoff(row: np.ndarray, top_p: float) -> np.float32:
    """ChatRWKV's cutoff as numpy computes it (0 where the running sum never reaches top_p)."""
    ranked = np.sort(row)[::-1]
    reached = np.cumsum(ranked) >= top_p
    return ranked[reached.argmax()] if reached.any() else np.float32(0)


def cutoff_rows():
    g = torch.Generator().manual_seed(5)
    for vocab in (1, 7, 1000, 65536):
        for scale in (0.1, 1.0, 4.0, 20.0):
            yield torch.softmax(torch.randn(3, vocab, generator=g) * scale, -1)
    tied = torch.softmax((torch.randn(2, 5000, generator=g) * 2).round(), -1)  # many exact ties
    yield tied
    yield torch.where(torch.rand(tied.shape, generator=g) < 0.5, tied, 0.0)  # banned tokens: zeros
    yield torch.softmax(torch.randn(1, 65536, generator=g) * 0.01, -1) * 0.5  # a sum that never reaches high top_p


@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.85, 0.850000030, 0.95, 0.999, 1.0])
def test_native_nucleus_cutoffs_are_numpys_exactly(top_p):
    """The radix-sorted float32 running sum cuts at the very value numpy's sort and cumsum do
    (the float32 sum rounds differently in any other order, so this fails unless the order and
    the arithmetic are the same); 0.850000030 is a top_p whose float32 rounding decides ties."""
    from rwkvkit.native import cpu

    for probs in cutoff_rows():
        ours = cpu.nucleus_cutoffs(probs, top_p)
        if ours is None:
            pytest.skip("the CPU kernels cannot be built here")
        expected = [numpy_cutoff(row, top_p) for row in probs.numpy()]
        assert ours.numpy().tolist() == [float(e) for e in expected]


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.85, 0.999])
def test_nucleus_cutoff_is_numpys_for_flat_peaked_and_mixed_batches(top_p):
    """``_nucleus_cutoff`` tries the top 64 first unless every row is too flat for it to reach
    ``top_p``; each path, and a batch mixing flat and peaked rows, cuts where numpy does."""
    batches = list(cutoff_rows())
    flat, peaked = batches[12], batches[15]  # 65,536 tokens at scales 0.1 (flat) and 20 (peaked)
    assert bool((flat.amax(-1) * 64 < top_p).all()) and bool((peaked.amax(-1) * 64 >= top_p).all())
    for probs in [*batches, torch.cat([flat, peaked])]:
        expected = [float(numpy_cutoff(row, top_p)) for row in probs.numpy()]
        assert samplers._nucleus_cutoff(probs, top_p)[:, 0].tolist() == expected
