"""Strategy strings -> plans; layer splitting across stages; clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import API_DEMO
from rwkvkit import RWKV, StrategyError
from rwkvkit.strategy import parse_strategy


def layers(plan) -> list[tuple[str, torch.dtype, list[int]]]:
    return [(str(s.placement.device), s.placement.dtype, list(s.layers)) for s in plan.stages]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("cpu fp32", [("cpu", torch.float32, [0, 1, 2, 3])]),
        ("cuda fp16", [("cuda", torch.float16, [0, 1, 2, 3])]),
        ("cuda:1 bf16", [("cuda:1", torch.bfloat16, [0, 1, 2, 3])]),
        ("cuda fp16 *1 -> cpu fp32", [("cuda", torch.float16, [0]), ("cpu", torch.float32, [1, 2, 3])]),
        ("cuda fp16 *1 -> cpu fp32 *1", [("cuda", torch.float16, [0]), ("cpu", torch.float32, [1, 2, 3])]),
        ("cpu fp32 -> cuda fp16 *3", [("cpu", torch.float32, [0]), ("cuda", torch.float16, [1, 2, 3])]),
        ("cuda fp16 *0 -> cpu fp32", [("cpu", torch.float32, [0, 1, 2, 3])]),
        ("  cpu   bf16  ", [("cpu", torch.bfloat16, [0, 1, 2, 3])]),
    ],
)
def test_parse(spec, expected):
    assert layers(parse_strategy(spec, 4)) == expected


def stream_layout(plan) -> list[tuple[str, bool, list[int]]]:
    return [(str(s.placement.device), s.placement.stream, list(s.layers)) for s in plan.stages]


@pytest.mark.parametrize(
    "spec, expected",
    [  # ChatRWKV: '*N+' keeps N layers resident and streams the rest of the model through that stage
        ("cuda fp16i8 *2+", [("cuda", False, [0, 1]), ("cuda", True, [2, 3])]),
        ("cuda fp16 *0+", [("cuda", True, [0, 1, 2, 3])]),
        ("cuda fp16 *4+", [("cuda", False, [0, 1, 2, 3])]),
        ("cuda fp16 *1+ -> cpu fp32 *1", [("cuda", False, [0]), ("cuda", True, [1, 2]), ("cpu", False, [3])]),
        ("cpu fp32 *1 -> cuda bf16 *1+", [("cpu", False, [0]), ("cuda", False, [1]), ("cuda", True, [2, 3])]),
    ],
)
def test_streaming_stage_keeps_n_layers_and_streams_the_rest(spec, expected):
    plan = parse_strategy(spec, 4)
    assert stream_layout(plan) == expected
    assert all(s.placement.quant == ("i8" if "i8" in spec and s.placement.device.type == "cuda" else None) for s in plan.stages)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpu fp16", "cannot parse stage 'gpu fp16'"),
        ("cpu fp8", "cannot parse stage 'cpu fp8'"),
        ("cpu fp32 -> ", "cannot parse stage ''"),
        ("cpu fp32 *x", "cannot parse stage 'cpu fp32 \\*x'"),
        ("cpu fp32 -> cpu bf16", "only one stage may omit"),
        ("cpu fp32 *3 -> cpu bf16 *3", "ask for 6 layers but the model has 4"),
        ("cpu fp32 *1+", "streams layers from CPU RAM to a GPU"),
        ("cuda fp16 *1+ -> cpu fp32", "only one stage may omit '\\*N' or stream"),
        ("", "expected a string like 'cpu fp32'"),
    ],
)
def test_bad_strategies_show_grammar_and_offending_part(spec, message):
    with pytest.raises(StrategyError, match=message) as info:
        parse_strategy(spec, 4)
    assert any(word in str(info.value) for word in ("grammar", "layers", "omit"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without CUDA")
def test_cuda_without_a_device(model_paths):
    with pytest.raises(StrategyError, match="no CUDA device found; try strategy 'cpu fp32'"):
        RWKV(model_paths["tiny"], "cuda fp16")


def test_int8_needs_a_quantizing_backend(model_paths):
    with pytest.raises(StrategyError, match="i8 weights need a quantizing backend"):
        RWKV(model_paths["tiny"], "cpu fp32i8", backend="torch")


def test_unknown_backend_lists_available(model_paths):
    with pytest.raises(Exception, match="unknown backend 'nope'; available: .*torch"):
        RWKV(model_paths["tiny"], "cpu fp32", backend="nope")


def test_split_model_matches_single_stage(model_paths):
    """Layer splitting only moves activations between stages: same math, same numbers. One
    decoded token is the exception: a model on one CPU stage runs it through ``fused_decode``,
    whose final layer norm sums in another order than torch's layer_norm (the blocks are the same
    kernels: the states stay equal bit for bit), so its logits agree to float32 rounding (measured
    2e-7 of the logit scale; 1e-5 allowed, as for the fused path's own test)."""
    whole = RWKV(model_paths["tiny"], "cpu fp32")
    split = RWKV(model_paths["tiny"], "cpu fp32 *1 -> cpu fp32")
    assert len(split.stages) == 2
    a, sa = whole.forward(API_DEMO, None)
    b, sb = split.forward(API_DEMO, None)
    assert torch.equal(a, b)
    c, sc = split.forward([9], sa)  # states are interchangeable between the two plans
    d, sd = whole.forward([9], sb)
    assert float((c - d).abs().max() / d.abs().max()) < 1e-5
    for x, y in zip(sc.layers, sd.layers):
        assert all(torch.equal(p, q) for p, q in zip(x.tensors(), y.tensors()))


def test_mixed_dtype_split_runs(model_paths):
    mixed = RWKV(model_paths["tiny"], "cpu bf16 *1 -> cpu fp32")
    out, state = mixed.forward(API_DEMO, None)
    assert state.layers[0].att_x_prev.dtype == torch.bfloat16 and state.layers[1].att_x_prev.dtype == torch.float32
    ref, _ = RWKV(model_paths["tiny"], "cpu fp32").forward(API_DEMO, None)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
