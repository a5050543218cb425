"""Streamed layers (``*N+``): matrices in CPU RAM, copied to the device per use, same numbers.

The strategy parser refuses streaming onto the CPU itself, so the CPU test builds its plan by hand
to exercise the bookkeeping (host copies, per-use copies, results); the GPU tests run the real
thing on a lent GPU machine and are skipped elsewhere.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.checkpoint import load_checkpoint
from rwkvkit.cuda_graphs import GraphedDecoder
from rwkvkit.model import Model
from rwkvkit.quant import Int8Weight
from rwkvkit.strategy import Plan, Stage, parse_strategy

SEQ = [5, 17, 300, 2, 9, 1000, 44]
no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine; streaming to a GPU runs on a lent GPU machine")


def _matrices(model: Model, layer: int) -> list[torch.Tensor]:
    stage = next(s for s in model.stages if layer in s.layers)
    att, ffn = stage.blocks[layer - stage.layers.start].att, stage.blocks[layer - stage.layers.start].ffn
    found = []
    for m in (att.receptance, att.key, att.value, att.output, ffn.key, ffn.value):
        found += [m.q, m.scale] if isinstance(m, Int8Weight) else [m]
    return found


def _run(model: Model) -> list[torch.Tensor]:
    """Prefill, then three decode steps: every logits tensor and the final state's tensors."""
    out, state = model.forward(SEQ, None)
    outs = [out]
    for token in (3, 4, 5):
        out, state = model.forward([token], state)
        outs.append(out)
    return [t.cpu() for t in outs] + [t.cpu() for layer in state.layers for t in layer.tensors()]


def test_streamed_stage_on_cpu_gives_identical_results(model_paths):
    checkpoint = load_checkpoint(model_paths["tiny"])
    plain = parse_strategy("cpu fp32", 2, backend="torch")
    placement = plain.stages[0].placement
    streamed = Plan((Stage(placement, range(0, 1), "torch"), Stage(replace(placement, stream=True), range(1, 2), "torch")), "hand-made")
    a, b = Model(checkpoint, plain), Model(checkpoint, streamed)
    assert b.stages[1].streamer is not None and b.stages[0].streamer is None
    for x, y in zip(_run(a), _run(b)):
        assert torch.equal(x, y)


@no_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "fp16i8", "bf16"])
def test_streamed_layers_match_resident_ones_on_gpu(model_paths, dtype):
    resident, streamed = RWKV(model_paths["world"], f"cuda {dtype}"), RWKV(model_paths["world"], f"cuda {dtype} *1+")
    assert [s.ops.placement.stream for s in streamed.stages] == [False, True]
    assert all(t.device.type == "cuda" for t in _matrices(streamed, 0))
    assert all(t.device.type == "cpu" and t.is_pinned() for layer in (1, 2) for t in _matrices(streamed, layer))
    for x, y in zip(_run(resident), _run(streamed)):
        assert torch.equal(x, y)  # same kernels on the same weights: bit for bit


@no_gpu
@pytest.mark.gpu
def test_graphed_decode_of_a_streamed_model(model_paths):
    model = RWKV(model_paths["world"], "cuda fp16 *0+")
    _, state = model.forward(SEQ, None)
    decoder = GraphedDecoder(model, state=state)
    for token in (3, 4, 5):
        ref, state = model.forward([token], state)
        assert torch.equal(decoder.step(token)[0], ref)
