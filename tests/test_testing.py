"""The random-checkpoint generator (``rwkvkit.testing``) makes models fit for testing."""

from __future__ import annotations

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.checkpoint import expected_shapes
from rwkvkit.testing import make_spec, random_checkpoint, save_checkpoint

SPEC = make_spec(n_layer=2, n_embd=128, vocab_size=256)
TOKENS = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0)).tolist()


def test_deterministic_from_seed():
    a, b, c = random_checkpoint(SPEC, seed=1), random_checkpoint(SPEC, seed=1), random_checkpoint(SPEC, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.att.w1"], c["blocks.1.att.w1"])


def test_fp16_stays_finite_and_close_over_1200_tokens(tmp_path):
    """fp16 overflows at 65504: a fixture with unrealistic activations would show inf/NaN here."""
    path = save_checkpoint(random_checkpoint(make_spec(4, 256, 4096), seed=5), tmp_path / "m.pth")
    seq = torch.randint(0, 4096, (1200,), generator=torch.Generator().manual_seed(0))
    ref, _ = RWKV(path, "cpu fp32").forward(seq, None, full_output=True)
    half, state = RWKV(path, "cpu fp16").forward(seq, None, full_output=True)
    assert torch.isfinite(half).all()
    assert all(torch.isfinite(t).all() for layer in state.layers for t in layer.tensors())
    assert float((half - ref).abs().max() / ref.abs().max()) < 1e-2  # 10 mantissa bits, 4 layers


KEYS = [k for k in expected_shapes(SPEC) if not k.startswith("blocks.0.att.v")]  # layer 0's v0..v2 are unused by design


@pytest.mark.parametrize("key", KEYS)
def test_every_weight_contributes(tmp_path, key):
    """Zeroing any one tensor changes the logits far above fp32 noise (~1e-7 of their scale): no
    path is dead in the fixture, so the oracle parity tests exercise every term of the math. (The
    weakest, the last layer's decay token-shift mix, moves logits by ~7e-4.)"""
    base = random_checkpoint(SPEC, seed=4)
    ref, _ = RWKV(save_checkpoint(base, tmp_path / "a.pth"), "cpu fp32").forward(TOKENS, None)
    broken = dict(base, **{key: torch.zeros_like(base[key])})
    out, _ = RWKV(save_checkpoint(broken, tmp_path / "b.pth"), "cpu fp32").forward(TOKENS, None)
    assert float((out - ref).abs().max() / ref.abs().max()) > 1e-4
