"""Built-in samplers: ChatRWKV's nucleus sampling (exactly), greedy, min-p and typical.

All draw from the run's seeded ``torch.Generator``, so the same seed gives the same text.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

from rwkvkit.errors import InputError
from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import SampleContext, Sampler
from rwkvkit.penalties import is_int


def _check(name: str, value: float, low: float, high: float = math.inf) -> float:
    """A finite real in [low, high] (bools refused: ``True`` is not a temperature)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and low <= value <= high):
        expected = f"a number in [{low}, {high}]" if high != math.inf else f"a finite number >= {low}"
        raise InputError(f"sampling option {name}={value!r}: expected {expected}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    """A non-negative integer; ``1.7`` is refused rather than silently truncated."""
    if not is_int(value) or value < 0:
        raise InputError(f"sampling option {name}={value!r}: expected an integer >= 0 (0 = no limit)")
    return int(value)


def nucleus_probs(probs: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """ChatRWKV's cutoff on float32 probabilities: keep every token whose probability is at least
    that of the token where the descending cumulative sum first reaches ``top_p`` (ties at the
    cutoff stay), then keep only the ``top_k`` most probable (0 = no limit). Returns a copy with the
    rest zeroed.

    One deliberate difference: if rounding keeps the float32 cumulative sum below ``top_p``
    (e.g. ``top_p=1.0``), ChatRWKV's ``argmax`` of an all-False array silently turns sampling into
    greedy decoding; here every token stays allowed.
    """
    probs = probs.copy()
    sorted_ids = np.argsort(probs)
    sorted_probs = probs[sorted_ids][::-1]
    reached = np.cumsum(sorted_probs) >= top_p
    cutoff = float(sorted_probs[np.argmax(reached)]) if reached.any() else 0.0
    probs[probs < cutoff] = 0
    if 0 < top_k < len(probs):
        probs[sorted_ids[:-top_k]] = 0
    return probs


def _draw(probs: torch.Tensor, ctx: SampleContext) -> int:
    return int(torch.multinomial(probs, 1, generator=ctx.generator)[0])


class NucleusSampler(Sampler):
    """ChatRWKV's ``sample_logits``: top-p cutoff, top-k, then temperature applied to the kept
    probabilities; ``temperature=0`` means greedy (as ChatRWKV: top_p becomes 0)."""

    name = "nucleus"

    def __init__(self, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0) -> None:
        self.temperature = _check("temperature", temperature, 0.0)
        self.top_p = _check("top_p", top_p, 0.0, 1.0)
        self.top_k = _check_count("top_k", top_k)

    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int:
        temperature, top_p = (1.0, 0.0) if self.temperature == 0 else (self.temperature, self.top_p)
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        kept = torch.from_numpy(nucleus_probs(probs, top_p, self.top_k)).double()
        if temperature != 1.0:
            kept = sharpen(kept, temperature)
        return _draw(kept, ctx)


def sharpen(kept: torch.Tensor, temperature: float) -> torch.Tensor:
    """ChatRWKV's ``kept ** (1 / temperature)`` (unnormalised, zeros stay zero).

    At very low temperatures that power underflows (for 65,536 tokens every weight does below
    T ~ 0.015) and ``multinomial`` would refuse an all-zero distribution; then the same
    weights are computed in log space relative to the most probable token, which stays at 1.
    Ordinary temperatures take the plain power, so their draws are exactly as before.
    """
    powered = kept ** (1.0 / temperature)
    if powered.max() >= torch.finfo(powered.dtype).tiny:  # a normal double: full precision kept
        return powered
    return torch.exp((kept.log() - kept.max().log()) / temperature)


class GreedySampler(Sampler):
    """The most probable token (lowest id on ties)."""

    name = "greedy"

    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int:
        return int(torch.argmax(logits))


class _FilteredSampler(Sampler):
    """Temperature, then a filter that keeps part of the distribution; temperature 0 is greedy."""

    def __init__(self, temperature: float) -> None:
        self.temperature = _check("temperature", temperature, 0.0)

    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int:
        if self.temperature == 0:
            return int(torch.argmax(logits))
        return _draw(self._keep(torch.log_softmax(logits.double() / self.temperature, dim=-1)), ctx)

    def _keep(self, logp: torch.Tensor) -> torch.Tensor:
        """Unnormalised probabilities of the kept tokens (zero elsewhere), from log-probabilities."""
        raise NotImplementedError


class MinPSampler(_FilteredSampler):
    """Keep tokens with probability >= ``min_p`` x the top probability (Nguyen et al., 2024)."""

    name = "min_p"

    def __init__(self, min_p: float = 0.05, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.min_p = _check("min_p", min_p, 0.0, 1.0)

    def _keep(self, logp: torch.Tensor) -> torch.Tensor:
        probs = logp.exp()
        return torch.where(probs >= self.min_p * probs.max(), probs, 0.0)


class TypicalSampler(_FilteredSampler):
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprisal is closest
    to the distribution's entropy, up to cumulative probability ``typical_p``."""

    name = "typical"

    def __init__(self, typical_p: float = 0.95, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.typical_p = _check("typical_p", typical_p, 0.0, 1.0)

    def _keep(self, logp: torch.Tensor) -> torch.Tensor:
        probs = logp.exp()
        entropy = -(probs * torch.nan_to_num(logp, neginf=0.0)).sum()
        order = torch.argsort((-logp - entropy).abs(), stable=True)
        cum = probs[order].cumsum(0)
        n_keep = int((cum < self.typical_p).sum()) + 1  # the smallest set reaching typical_p
        kept = torch.zeros_like(probs)
        kept[order[:n_keep]] = probs[order[:n_keep]]
        return kept


@hookimpl
def register_samplers(register) -> None:
    for cls in (NucleusSampler, GreedySampler, MinPSampler, TypicalSampler):
        register(cls)
