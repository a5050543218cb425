"""Issue 13, sampling options: every way to pass a bad option gives a clear InputError (samplers,
penalties, PIPELINE_ARGS, Hydra configs); extreme but valid temperatures still sample, and a
banned token is never drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rwkvkit import PIPELINE_ARGS
from rwkvkit.config import SamplingConfig, make_penalties, make_sampler, make_stops
from rwkvkit.errors import InputError
from rwkvkit.interfaces import SampleContext
from rwkvkit.penalties import Penalties
from rwkvkit.plugins.samplers import MinPSampler, NucleusSampler, TypicalSampler, nucleus_probs, sharpen

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NucleusSampler(temperature=INF), r"temperature=inf: expected a finite number >= 0"),
        (lambda: NucleusSampler(temperature=NAN), r"temperature=nan"),
        (lambda: NucleusSampler(temperature=True), r"temperature=True"),
        (lambda: NucleusSampler(top_p=NAN), r"top_p=nan: expected a number in \[0.0, 1.0\]"),
        (lambda: NucleusSampler(top_k=1.7), r"top_k=1.7: expected an integer >= 0"),
        (lambda: NucleusSampler(top_k=INF), r"top_k=inf: expected an integer >= 0"),
        (lambda: NucleusSampler(top_k=True), r"top_k=True"),
        (lambda: MinPSampler(temperature=INF), r"temperature=inf"),
        (lambda: TypicalSampler(typical_p=NAN), r"typical_p=nan"),
    ],
)
def test_bad_sampler_option(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_integer_like_options_are_accepted():
    sampler = NucleusSampler(temperature=np.float32(0.5), top_p=1, top_k=np.int64(5))
    assert (sampler.temperature, sampler.top_p, sampler.top_k) == (0.5, 1.0, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(presence=NAN), r"alpha_presence=nan: expected a finite number"),
        (dict(frequency=-INF), r"alpha_frequency=-inf"),
        (dict(decay=1.5), r"alpha_decay=1.5: expected a finite number in \[0, 1\]"),
        (dict(decay=NAN), r"alpha_decay=nan"),
        (dict(ban=[0, True]), r"token_ban has non-integer value\(s\) \[True\]"),
        (dict(ban=[1.5]), r"token_ban has non-integer value\(s\) \[1.5\]"),
        (dict(ban=7), r"token_ban=7: expected a list of token ids"),
    ],
)
def test_bad_penalties(kwargs, message):
    with pytest.raises(InputError, match=message):
        Penalties(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=INF), r"temperature=inf"),
        (dict(top_k=1.7), r"top_k=1.7"),
        (dict(alpha_presence=NAN), r"alpha_presence=nan"),
        (dict(token_stop=[1.5]), r"token_stop has \[1.5\]: expected token ids \(integers\) or non-empty stop strings"),
        (dict(token_stop=[None, False]), r"token_stop has \[None, False\]"),
        (dict(token_stop=[""]), r"token_stop has \[''\]"),
        (dict(token_stop=0), r"token_stop=0: expected a list"),
        (dict(chunk_len=2.5), r"chunk_len=2.5: expected an integer >= 1"),
    ],
)
def test_pipeline_args_checked_on_construction(kwargs, message):
    with pytest.raises(InputError, match=message):
        PIPELINE_ARGS(**kwargs)


def test_pipeline_args_accept_stop_strings_and_ids():
    args = PIPELINE_ARGS(token_stop=[0, "\n\n"], chunk_len=None)
    assert args.token_stop == [0, "\n\n"] and args.chunk_len is None


@pytest.mark.parametrize(
    "override, make, message",
    [
        ({"temperature": INF}, make_sampler, r"sampling: sampling option temperature=inf"),
        ({"name": "min_p", "temperature": NAN}, make_sampler, r"temperature=nan"),
        ({"alpha_presence": NAN}, make_penalties, r"alpha_presence=nan"),
        ({"token_stop": [1.5]}, make_stops, r"sampling.token_stop has \[1.5\]"),
        ({"token_stop": [True]}, make_stops, r"sampling.token_stop has \[True\]"),
    ],
)
def test_bad_hydra_sampling_config(override, make, message):
    cfg = OmegaConf.merge(OmegaConf.structured(SamplingConfig), override)
    with pytest.raises(InputError, match=message):
        make(cfg)


def test_hydra_token_stop_takes_ids_and_strings():
    cfg = OmegaConf.merge(OmegaConf.structured(SamplingConfig), {"token_stop": [0, "\n\n"]})
    assert make_stops(cfg) == [0, "\n\n"] and cfg.chunk_len is None


def _banned_logits(vocab: int = 65536) -> torch.Tensor:
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2
    logits[::2] = -INF  # every even id is banned
    return logits


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e6, 1e300])
@pytest.mark.parametrize("make", [lambda t: NucleusSampler(temperature=t, top_p=1.0), lambda t: MinPSampler(0.0, temperature=t), lambda t: TypicalSampler(1.0, temperature=t)])
def test_extreme_temperatures_sample_and_never_pick_a_banned_token(temperature, make):
    """T=1e-3 used to raise 'invalid multinomial distribution' (every weight underflowed)."""
    logits = _banned_logits()
    ctx = SampleContext(torch.Generator().manual_seed(1))
    drawn = [make(temperature).sample(logits, ctx) for _ in range(20)]
    assert all(t % 2 == 1 for t in drawn)
    if temperature <= 1e-3:  # practically greedy
        assert set(drawn) == {int(logits.argmax())}


@pytest.mark.parametrize("temperature", [0.05, 0.5, 0.7, 1.5, 3.0])
def test_ordinary_temperatures_keep_chatrwkvs_exact_weights(temperature):
    """The weights handed to the draw are bit for bit ``kept ** (1 / T)`` as before, so the
    same seed draws the same tokens."""
    probs = torch.softmax(_banned_logits(), 0).numpy()
    kept = torch.from_numpy(nucleus_probs(probs, 0.9, 0)).double()
    assert torch.equal(sharpen(kept, temperature), kept ** (1.0 / temperature))


def test_low_temperature_weights_are_relative_to_the_top_token():
    kept = torch.tensor([0.0, 1e-5, 2e-5, 4e-5], dtype=torch.float64)
    weights = sharpen(kept, 1e-2)
    assert weights[0] == 0 and weights[3] == 1 and math.isclose(float(weights[2]), 0.5**100, rel_tol=1e-9)
