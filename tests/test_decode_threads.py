"""Native decode gives bit-identical results for any thread count."""

from __future__ import annotations

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.native import cpu


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16", "cpu fp32i8"])
def test_decode_is_bit_identical_for_any_thread_count(model_paths, strategy):
    """The kernels split work into shares that do not depend on the thread count, so a seed fixes
    the text whatever ``strategy.threads`` (or torch's default) is."""
    model = RWKV(model_paths["world"], strategy)
    stage = model.stages[0]
    _, state = model.forward([1, 2, 3], None)
    x = torch.randn(1, 1, model.spec.n_embd, generator=torch.Generator().manual_seed(0)).to(stage.ops.placement.dtype)
    layers = [block.native for block in stage.blocks]
    outs = [cpu.decode_stage(layers, x, None, state.layers, stage.ops.placement.dtype, threads) for threads in (1, 2, 3)]
    for out in outs[1:]:
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1])
        for a, b in zip(out[2], outs[0][2]):
            assert all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))
