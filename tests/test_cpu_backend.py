"""The ``cpu`` backend: selection, its kernels against the torch backend, and its fallback.
(Oracle parity for it runs in test_oracle_parity.py, parametrized over backends.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rwkvkit import RWKV, InputError
from rwkvkit.backend import Backend
from rwkvkit.models import rwkv7
from rwkvkit.native import cpu
from rwkvkit.plugins.cpu_backend import CpuBackend
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.state import LayerState
from rwkvkit.strategy import Placement

CPU = torch.device("cpu")


def test_auto_picks_cpu_for_fp32_and_bf16_and_torch_for_fp16(model_paths):
    for spec, expected in (("cpu fp32", CpuBackend), ("cpu bf16", CpuBackend), ("cpu fp16", TorchBackend)):
        assert type(RWKV(model_paths["tiny"], spec).stages[0].ops) is expected


@pytest.mark.parametrize("placement, reason", [(Placement(torch.device("cuda"), torch.float16), "CPU only"), (Placement(CPU, torch.float16), "fp32 and bf16 only")])
def test_unavailable_reasons(placement, reason):
    assert reason in CpuBackend.unavailable_reason(placement)


def random_wkv_inputs(B, T, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a = torch.rand(B, T, H, N, generator=g)
    decay = torch.exp(-0.6065 * torch.rand(B, T, H, N, generator=g))
    kv = torch.randn(B, H, N, N, generator=g) * 0.1
    return kv, r, decay, k, v, kk, a


@pytest.mark.parametrize("B, T, H, N", [(1, 1, 2, 64), (3, 37, 4, 64), (2, 5, 3, 32)])
def test_wkv_kernel_matches_torch_scan(B, T, H, N):
    """fp32 both ways; only the summation order differs (measured ~1e-6 relative)."""
    inputs = random_wkv_inputs(B, T, H, N)
    kv_before = inputs[0].clone()
    place = Placement(CPU, torch.float32)
    y_ref, s_ref = TorchBackend(place).wkv(*inputs)
    y, s = CpuBackend(place).wkv(*inputs)
    assert torch.equal(inputs[0], kv_before)  # the input state is not modified
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * float(y_ref.abs().max()))
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4 * float(s_ref.abs().max()))


@pytest.mark.parametrize("rows, cols", [(768, 768), (3072, 768), (768, 3072), (100, 200), (7, 45)])
def test_bf16_gemv_matches_fp32_product_of_bf16_values(rows, cols):
    """The kernel multiplies bf16 values exactly and accumulates in fp32, so it must match an fp32
    product of the same bf16 values up to summation order (~1e-6), then one rounding to bf16."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g).bfloat16()
    x = torch.randn(1, 1, cols, generator=g).bfloat16()
    y = CpuBackend(Placement(CPU, torch.bfloat16)).linear(x, w)
    ref = torch.nn.functional.linear(x.float(), w.float())
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, rows)
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=8e-3 * float(ref.abs().max()))  # bf16 output rounding: 2^-8


def test_without_a_compiler_it_falls_back_to_torch_ops(model_paths, monkeypatch):
    ref, _ = RWKV(model_paths["tiny"], "cpu fp32", backend="torch").forward([1, 2, 3], None)
    monkeypatch.setattr(cpu, "library", lambda: None)
    out, _ = RWKV(model_paths["tiny"], "cpu fp32", backend="cpu").forward([1, 2, 3], None)
    assert torch.equal(out, ref)


def use_the_torch_ops(monkeypatch) -> None:
    """CpuBackend (and Int8Backend) without its fused model, stage and ops: rwkv7.block over the
    torch defaults, with only ``linear`` and ``wkv`` native."""
    for op in ("fused_decode", "fused_stage", "ln_mix", "project", "lora", "time_mix_core"):
        monkeypatch.setattr(CpuBackend, op, getattr(Backend, op))


@pytest.mark.parametrize("spec, backend, tol", [("cpu fp32", "cpu", 2e-5), ("cpu fp32i8", "int8", 1e-4), ("cpu bf16", "cpu", 0.03), ("cpu bf16i8", "int8", 0.03)])
def test_fused_decode_matches_the_python_math(model_paths, monkeypatch, spec, backend, tol):
    """The native one-token stage against rwkv7.block over the torch ops on the same prepared weights. fp32: same
    math, only summation order differs (2e-5 as for the oracle). int8: both paths share the int8
    kernel, which rounds x to int16 steps of max|x|/32767; fp32-level differences in x can move an
    element across a step, so 1e-4 (measured 3e-5). bf16: the
    native stage computes activations in fp32 where the torch ops round each step to bf16 (2^-9),
    so they differ by bf16 noise (measured ~8e-3 of the logit scale over 20 steps)."""
    seq = torch.randint(0, 65536, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    model = RWKV(model_paths["world"], spec, backend=backend)
    _, start = model.forward(seq[:10], None)

    def run():
        state, outs = start, []
        for t in seq[10:]:
            out, state = model.forward([t], state)
            outs.append(out)
        return torch.stack(outs), state

    fused, fused_state = run()
    use_the_torch_ops(monkeypatch)
    ref, ref_state = run()
    assert float((fused - ref).abs().max() / ref.abs().max()) < tol
    kv, ref_kv = fused_state.layers[-1].att_kv, ref_state.layers[-1].att_kv
    assert float((kv - ref_kv).abs().max() / ref_kv.abs().max()) < tol * 5
    assert fused_state.layers[0].att_x_prev.dtype == ref_state.layers[0].att_x_prev.dtype


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("spec, backend", [("cpu fp32", "cpu"), ("cpu fp32i8", "int8")])
def test_fused_stage_is_the_ops_composed(model_paths, spec, backend, B):
    """decode_layers calls the very kernels of the op entry points, in rwkv7.block's order: with
    fp32 activations (nothing to round between ops) it equals rwkv7.block over the backend's ops,
    one Python call per op, bit for bit, for one sequence and for a batch."""
    model = RWKV(model_paths["world"], spec, backend=backend)
    stage = model.stages[0]
    _, state = model.forward(torch.tensor([[1, 2, 3]] * B), None)
    x = torch.randn(B, 1, model.spec.n_embd, generator=torch.Generator().manual_seed(0))
    fused = stage.ops.fused_stage(stage.blocks, x, None, state.layers)
    assert fused is not None
    y, v_first, layers = x, None, []
    for w, s in zip(stage.blocks, state.layers):
        y, v_first, s = rwkv7.block(stage.ops, w, y, v_first, s)
        layers.append(s)
    assert torch.equal(fused[0], y) and torch.equal(fused[1], v_first)
    for a, b in zip(fused[2], layers):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("spec, backend, tol", [("cpu fp32", "cpu", 1e-5), ("cpu fp32i8", "int8", 1e-4), ("cpu bf16", "cpu", 1e-2), ("cpu bf16i4", "int4", 1e-2)])
def test_fused_decode_is_the_stage_and_head_composed(model_paths, monkeypatch, spec, backend, tol, B):
    """A decoded token through decode_model (the embedding, decode_layers, the final layer norm and
    the head in one native call) against the same token through embed, fused_stage and the head's
    ops. The states come from the same kernels in the same order: equal bit for bit, and so is the
    embedding's rounding. The logits differ only through the final layer norm (native vs torch's
    layer_norm, another summation order): fp32 ~1e-7 of the logit scale, so 1e-5; int8 rounds the
    normed rows to int16 steps, where that can move an input by one step, so 1e-4 (as the fused
    stage's test); bf16 rounds the normed rows to 8 bits, where a last-bit difference can move an
    input by 2^-8, so 1e-2, and its logits are rounded to bf16 as the op path's are. Measured on
    these seeds: fp32 2e-7, int8 4e-6, bf16 0 (the roundings agreed)."""
    model = RWKV(model_paths["world"], spec, backend=backend)
    g = torch.Generator().manual_seed(B)
    _, state = model.forward(torch.randint(0, 65536, (B, 4), generator=g), None)
    steps = [torch.randint(0, 65536, (B, 1), generator=g) for _ in range(4)]

    def run():
        s, outs = state, []
        for ids in steps:
            out, s = model.forward(ids, s)
            outs.append(out)
        return torch.stack(outs), s

    stage = model.stages[0]
    assert stage.ops.fused_decode(model.emb, stage.blocks, model.head, steps[0], state.layers) is not None
    fused, fused_state = run()
    monkeypatch.setattr(type(stage.ops), "fused_decode", Backend.fused_decode)
    ref, ref_state = run()
    assert fused.dtype == torch.float32 and fused.shape == ref.shape == (4, B, 65536)
    assert _rel(fused, ref) < tol
    if "bf16" in spec:
        assert torch.equal(fused, fused.bfloat16().float())
    for a, b in zip(fused_state.layers, ref_state.layers):
        assert all(torch.equal(s, t) and s.dtype == t.dtype for s, t in zip(a.tensors(), b.tensors()))


def test_fused_decode_refuses_an_id_outside_the_embedding_and_keeps_full_output_shapes(model_paths):
    model = RWKV(model_paths["world"], "cpu fp32", backend="cpu")
    stage = model.stages[0]
    _, state = model.forward([1, 2], None)
    with pytest.raises(InputError, match="token id outside the embedding"):
        stage.ops.fused_decode(model.emb, stage.blocks, model.head, torch.tensor([[65536]]), state.layers)
    last, _ = model.forward([3], state)
    full, _ = model.forward([3], state, full_output=True)
    assert full.shape == (1, 65536) and torch.equal(full[0], last)


def _block_inputs(model: RWKV, layer: int, B: int, T: int, seed: int):
    """A block's inputs at the scale a real run sees: x and v_first ~ unit, a state carried from
    earlier tokens (non-zero kv and x_prev), so that the token shift and the scan's start count."""
    assert cpu.library() is not None, "the kernels must build here, else the fallback is tested"
    g = torch.Generator().manual_seed(seed)
    spec, dtype = model.spec, model.stages[0].ops.placement.dtype
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    x = torch.randn(B, T, C, generator=g).to(dtype)
    v_first = None if layer == 0 else torch.randn(B, T, C, generator=g).to(dtype)
    state = LayerState(torch.randn(B, C, generator=g).to(dtype), torch.randn(B, H, N, N, generator=g) * 0.3, torch.randn(B, C, generator=g).to(dtype))
    return model.stages[0].blocks[layer], x, v_first, state


def _as_fp32(weights):
    """A weights dataclass with every tensor in fp32 (nested groups too)."""
    return type(weights)(**{f.name: _as_fp32(v) if dataclasses.is_dataclass(v) else (v if v is None else v.float()) for f in dataclasses.fields(weights) for v in [getattr(weights, f.name)]})


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.mark.parametrize("B, T", [(1, 2), (1, 3), (2, 1), (1, 64), (2, 300)])
@pytest.mark.parametrize("layer", [0, 1])
def test_block_over_the_native_ops_matches_the_torch_ops_fp32(model_paths, B, T, layer):
    """rwkv7.block over the backend's ops against the torch ops. fp32 both ways; the kernels sum in another order, use FMA and a polynomial exp (~2 ulp):
    measured ~1e-6 relative, so the oracle's 2e-5 holds with margin for x, v_first and the state."""
    model = RWKV(model_paths["world"], "cpu fp32", backend="cpu")
    ops = model.stages[0].ops
    weights, x, v_first, state = _block_inputs(model, layer, B, T, seed=T + layer)
    got = rwkv7.block(ops, weights, x, v_first, state)
    ref = rwkv7.block(TorchBackend(ops.placement), weights, x, v_first, state)
    for a, b in zip((got[0], got[1], *got[2].tensors()), (ref[0], ref[1], *ref[2].tensors())):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) < 2e-5


@pytest.mark.parametrize("B, T", [(1, 3), (1, 64), (2, 300)])
@pytest.mark.parametrize("layer", [0, 1])
def test_block_over_the_native_ops_in_bf16_is_as_accurate_as_the_torch_ops(model_paths, B, T, layer):
    """bf16: the kernels keep activations in fp32 inside each op, where the torch ops round every
    step to bf16, so the two differ by bf16 noise. Both are measured against the fp32 math on
    the same (bf16-valued) weights and inputs: the native ops must be no less accurate (1.5x, as
    the oracle parity test allows) plus 2e-3 of slack for the GEMM inputs' rounding."""
    model = RWKV(model_paths["world"], "cpu bf16", backend="cpu")
    ops = model.stages[0].ops
    weights, x, v_first, state = _block_inputs(model, layer, B, T, seed=T + layer)
    got = rwkv7.block(ops, weights, x, v_first, state)
    ref16 = rwkv7.block(TorchBackend(ops.placement), weights, x, v_first, state)
    f32 = Placement(CPU, torch.float32)
    vf32 = None if v_first is None else v_first.float()
    state32 = LayerState(*(t.float() for t in state.tensors()))
    ref32 = rwkv7.block(TorchBackend(f32), _as_fp32(weights), x.float(), vf32, state32)
    for a, b, exact in zip((got[0], got[1], *got[2].tensors()), (ref16[0], ref16[1], *ref16[2].tensors()), (ref32[0], ref32[1], *ref32[2].tensors())):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, exact) <= 1.5 * _rel(b, exact) + 2e-3


@pytest.mark.parametrize("spec, backend, tol", [("cpu fp32", "cpu", 2e-5), ("cpu fp32i8", "int8", 0.03), ("cpu bf16", "cpu", 0.03), ("cpu bf16i8", "int8", 0.03)])
def test_chunked_batched_prefill_matches_the_python_math(model_paths, monkeypatch, spec, backend, tol):
    """Whole-model prefill in chunks of 1, 2, 64 and 93 tokens for a batch of 2, the state carried
    between chunks, against the same model over the torch ops, logits and every state tensor.
    fp32: 2e-5 as for the oracle (measured 5e-7). bf16: the torch ops round each step to bf16, so
    the two differ by bf16 noise over 160 tokens and 3 layers (measured 8e-3; 0.03 as for fused
    decode). fp32i8: both paths round GEMM inputs to int8 per row, and a last-bit difference can
    move an activation across a rounding boundary, one step (1/127 of its row's max) apart
    (measured 6e-3; 0.03 as for bf16)."""
    tokens = torch.randint(0, 65536, (2, 160), generator=torch.Generator().manual_seed(3))
    model = RWKV(model_paths["world"], spec, backend=backend)

    def run():
        state, outs = None, []
        for lo, hi in ((0, 1), (1, 3), (3, 67), (67, 160)):
            out, state = model.forward(tokens[:, lo:hi], state, full_output=True)
            outs.append(out)
        return torch.cat(outs, dim=1), state

    fused, fused_state = run()
    use_the_torch_ops(monkeypatch)
    ref, ref_state = run()
    assert _rel(fused, ref) < tol
    for a, b in zip((t for layer in fused_state.layers for t in layer.tensors()), (t for layer in ref_state.layers for t in layer.tensors())):
        assert a.dtype == b.dtype and _rel(a, b) < tol


@pytest.mark.parametrize("spec, backend, B", [("cpu fp32", "cpu", 13), ("cpu bf16", "cpu", 11), ("cpu fp32i8", "int8", 11), ("cpu bf16i8", "int8", 3)])
def test_batched_decode_equals_each_sequence_alone_bit_for_bit(model_paths, spec, backend, B):
    """A decode step of B sequences reads each weight once for all rows, yet forms each row's sums
    exactly as for a lone row (int8: the row's own 16-bit step), so logits and states equal each
    sequence decoded alone, bit for bit. fp32/bf16 tiles take 6 rows, int8 and LoRA tiles 4: B = 13 is
    two tiles and a lone row (int8, LoRA: three and one), 11 a tile and a remainder of 5 (int8, LoRA:
    two tiles and 3), 3 a remainder alone."""
    model = RWKV(model_paths["world"], spec, backend=backend)
    g = torch.Generator().manual_seed(B)
    _, state = model.forward(torch.randint(0, 65536, (B, 5), generator=g), None)
    tokens = torch.randint(0, 65536, (B, 1), generator=g)
    together, new = model.forward(tokens, state)
    for b in range(B):
        alone, new_b = model.forward(tokens[b], state[b])
        assert torch.equal(alone, together[b])
        for a, t in zip((t for layer in new_b.layers for t in layer.tensors()), (t for layer in new[b].layers for t in layer.tensors())):
            assert torch.equal(a, t)


def test_decode_state_buffers_are_reused_only_once_released():
    """The decode stage's output buffers (``cpu._Recycled``) come back only when no tensor, not
    even a view, still uses their memory; past ``keep`` held buffers, plain new tensors."""
    pool = cpu._Recycled(keep=2)
    a, b = pool.empty(10), pool.empty(10)
    first, second = a.data_ptr(), b.data_ptr()
    view = a[2:5]
    del a
    c = pool.empty(10)  # both pooled buffers in use (one through a view): a fresh tensor
    assert c.data_ptr() not in (first, second)
    del view
    assert pool.empty(10).data_ptr() == first
    del b
    bigger = pool.empty(20)  # the free buffer of another size is replaced
    assert bigger.shape == (20,) and bigger.data_ptr() not in (first, second)


def test_recycled_logits_are_never_overwritten_while_held(model_paths, monkeypatch):
    """Large decode logits come from ``cpu._LOGITS`` (a fresh 4 MB each step cost ~20% of a B = 16
    step): a step's logits that the caller keeps stay as they were through later steps, and a
    released buffer, reused, holds the new step's logits exactly as a fresh one would."""
    model = RWKV(model_paths["world"], "cpu fp32", backend="cpu")
    g = torch.Generator().manual_seed(3)
    _, state = model.forward(torch.randint(0, 65536, (4, 3), generator=g), None)
    steps = torch.randint(0, 65536, (4, 4, 1), generator=g)
    monkeypatch.setattr(cpu, "_LOGITS_RECYCLED", 1 << 62)  # first, fresh tensors only
    fresh = []
    s = state
    for tokens in steps:
        logits, s = model.forward(tokens, s)
        fresh.append(logits)
    monkeypatch.setattr(cpu, "_LOGITS_RECYCLED", 0)  # then every size recycled, from a pool of this test's own
    monkeypatch.setattr(cpu, "_LOGITS", cpu._Recycled(keep=2))
    kept, s, pointers = None, state, set()
    for i, tokens in enumerate(steps):
        logits, s = model.forward(tokens, s)
        pointers.add(logits.data_ptr())
        assert torch.equal(logits, fresh[i])
        if i == 0:
            kept, kept_copy = logits, logits.clone()
        del logits
    assert torch.equal(kept, kept_copy)
    assert kept.data_ptr() in pointers and len(pointers) == 2  # the kept buffer and one reused


def test_more_rows_than_native_rows_take_the_gemm_and_match_the_python_math(model_paths, monkeypatch):
    """Past ``native_rows`` decoded rows, fp32 products go to oneDNN's GEMM (and no fused stage):
    the same math in another summation order (2e-5, as for the oracle)."""
    model = RWKV(model_paths["world"], "cpu fp32", backend="cpu")
    B = model.stages[0].ops.native_rows + 1
    g = torch.Generator().manual_seed(0)
    _, state = model.forward(torch.randint(0, 65536, (B, 5), generator=g), None)
    tokens = torch.randint(0, 65536, (B, 1), generator=g)
    assert model.stages[0].ops.fused_stage(model.stages[0].blocks, torch.zeros(B, 1, model.spec.n_embd), None, state.layers) is None
    got, _ = model.forward(tokens, state)
    use_the_torch_ops(monkeypatch)
    ref, _ = model.forward(tokens, state)
    assert _rel(got, ref) < 2e-5
