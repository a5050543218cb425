"""The ``cuda`` backend (kernels/), int8 quantization and CUDA-graph decoding.

The first half runs anywhere: Python glue, fallbacks and messages. The ``gpu`` half checks the
kernels against the ``torch`` backend on a CUDA device and is skipped with a reason elsewhere;
``benchmarks/gpu_check.sh`` runs it on a lent GPU machine.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from rwkvkit import RWKV, StrategyError, kernels_build
from rwkvkit.backend import Role
from rwkvkit.cli import main
from rwkvkit.cuda_graphs import GraphedDecoder
from rwkvkit.hookspecs import hookimpl
from rwkvkit.kernels_build import KernelBuildError, build_dir, ops, toolchain_problem
from rwkvkit.model import select_backend
from rwkvkit.plugins.cuda_backend import HEAD_SIZE, MAX_MATVEC_ROWS, CudaBackend
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.quant import QMAX, quantize_per_channel
from rwkvkit.registry import registry
from rwkvkit.strategy import Placement

HAS_CUDA = torch.cuda.is_available()
no_cuda_here = pytest.mark.skipif(HAS_CUDA, reason="checks the messages of a machine without a CUDA device")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# One ulp of the output dtype: kernel and reference read the same rounded inputs, compute in
# float32 and differ only in summation order (~1e-6 relative, hence 1e-5 for fp32) before the
# output is rounded once, so a value may land one ulp apart.
ULP = {"fp32": 1e-5, "fp16": 2**-10, "bf16": 2**-7}


def gpu_test(fn):
    reason = "no CUDA device on this machine; GPU paths are exercised on a lent GPU machine (benchmarks/gpu_check.sh)"
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason=reason)(fn))


def placement(device: str = "cuda", dtype: torch.dtype = torch.float16, quant: str | None = None) -> Placement:
    return Placement(torch.device(device), dtype, quant)


# ---------------------------------------------------------------- anywhere: glue and messages


def test_cuda_backend_is_registered():
    assert registry.get("backends", "cuda") is CudaBackend


def test_cpu_placements_are_refused():
    assert "CUDA placements only" in CudaBackend.unavailable_reason(placement("cpu", torch.float32))


@no_cuda_here
def test_without_a_gpu_auto_falls_back_and_cuda_says_why():
    assert "no CUDA device" in CudaBackend.unavailable_reason(placement())
    assert select_backend("auto", placement("cpu", torch.float32)) is not CudaBackend
    with pytest.raises(StrategyError, match=r"cuda: no CUDA device found"):
        select_backend("cuda", placement(quant="i8"))


@pytest.mark.skipif(torch.version.cuda is not None, reason="this PyTorch has CUDA; the message is for CPU-only builds")
def test_cpu_only_torch_gets_an_actionable_message(capsys):
    problem = toolchain_problem()
    assert "built without CUDA" in problem and "backend 'torch'" in problem
    with pytest.raises(KernelBuildError, match="built without CUDA"):
        ops()
    assert main(["build-kernels"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvkit: error: ") and "built without CUDA" in err and "Traceback" not in err


def test_build_goes_to_the_rwkvkit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path))
    assert build_dir().parent == tmp_path / "torch_extensions"
    assert torch.__version__ in build_dir().name


def test_importing_and_selecting_builds_nothing(tmp_path):
    code = (
        "import sys, torch, rwkvkit\n"
        "from rwkvkit.model import select_backend\n"
        "from rwkvkit.strategy import Placement\n"
        "select_backend('auto', Placement(torch.device('cpu'), torch.float32))\n"
        "print('torch.utils.cpp_extension' in sys.modules)\n"
    )
    env = {**os.environ, "RWKVKIT_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert not (tmp_path / "torch_extensions").exists()


def test_head_and_matvec_limits_match_the_kernels():
    header = resources.files("rwkvkit.kernels").joinpath("rwkvkit_cuda.h").read_text()
    assert int(re.search(r"kHeadSize = (\d+);", header)[1]) == HEAD_SIZE
    assert int(re.search(r"kMaxMatvecRows = (\d+);", header)[1]) == MAX_MATVEC_ROWS


def test_quantize_per_channel_error_is_half_a_step():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64).unsqueeze(1)
    w[5] = 0
    qw = quantize_per_channel(w)
    assert qw.q.dtype == torch.int8 and qw.scale.dtype == torch.float32 and qw.shape == w.shape
    assert (qw.q.abs().amax(dim=1)[torch.arange(64) != 5] == QMAX).all()  # each row's absmax is exact
    assert (qw.dequantize() - w).abs().le(qw.scale.unsqueeze(1) / 2 * (1 + 1e-6)).all()
    assert not qw.dequantize()[5].any()
    for dtype in (torch.float16, torch.bfloat16):
        assert qw.dequantize(dtype).dtype == dtype


class _DequantizedTorch(TorchBackend):
    """The torch backend on int8-rounded matrices: what ``fp16i8`` computes, without kernels."""

    name = "torch_int8_reference"

    def prepare(self, tensor, role):
        return super().prepare(quantize_per_channel(tensor).dequantize() if role is Role.MATRIX else tensor, role)


@hookimpl
def register_backends(register):
    register(_DequantizedTorch)


@pytest.fixture
def dequantized_torch_backend():
    registry.add(sys.modules[__name__], "test-int8-reference")
    yield _DequantizedTorch.name
    registry.remove("test-int8-reference")


class ReferenceOps:
    """The kernels' contract in torch, asserting what kernels/rwkvkit_ops.cpp checks, so that the
    cuda backend's Python glue (argument order, shapes, the int8 decode/prefill split) runs here."""

    @staticmethod
    def wkv7(kv, r, w, k, v, kk, a):
        B, T, H, N = r.shape
        assert N == HEAD_SIZE and w.dtype == kv.dtype == torch.float32 and kv.shape == (B, H, N, N) and w.shape == r.shape
        assert all(t.shape == r.shape and t.dtype == r.dtype and t.is_contiguous() for t in (r, k, v, kk, a))
        return TorchBackend(Placement(r.device, r.dtype)).wkv(kv, r, w, k, v, kk, a)

    @staticmethod
    def matvec(xs, ws, scales, epilogues, residual):
        assert 1 <= len(xs) == len(ws) == len(scales) == len(epilogues) <= 8 and (residual is None or len(xs) == 1)
        rows = xs[0].shape[0]
        ys = []
        for x, w, scale, epilogue in zip(xs, ws, scales, epilogues):
            assert x.dim() == 2 and x.shape == (rows, w.shape[1]) and 1 <= rows <= MAX_MATVEC_ROWS and x.is_contiguous()
            int8 = scale.numel() > 0
            assert w.dtype == (torch.int8 if int8 else x.dtype) and (not int8 or (scale.dtype == torch.float32 and scale.shape == w.shape[:1]))
            assert w.shape[1] % (16 if int8 else 16 // x.element_size()) == 0
            y = x.float() @ w.float().T * (scale if int8 else 1)
            y = [y, torch.tanh(y), torch.sigmoid(y), torch.relu(y) ** 2][epilogue]
            ys.append((y + residual.float() if residual is not None else y).to(x.dtype))
        return ys

    @staticmethod
    def ln_mix(x, weight, bias, x_prev, mixes, eps):
        assert x.dim() == 2 and x.is_contiguous() and x_prev.shape == x.shape and x_prev.is_contiguous() and 1 <= len(mixes) <= 6
        assert all(t.shape == (x.shape[1],) and t.dtype == x.dtype for t in (weight, bias, *mixes))
        x_ln = F.layer_norm(x.float(), x.shape[1:], weight.float(), bias.float(), eps).to(x.dtype)
        base = x_ln.float()
        return x_ln, torch.stack([base + (x_prev.float() - base) * m.float() for m in mixes]).to(x.dtype)

    @staticmethod
    def wkv7_decode(kv, r, k, v, w_lora, a_lora, v_lora, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, v_first, eps):
        """The time mix between its projections (rwkv7.time_mix) for one token, in float32."""
        B, C = r.shape
        H, N = C // HEAD_SIZE, HEAD_SIZE
        assert kv.shape == (B, H, N, N) and kv.dtype == torch.float32 and (v_lora is None) == (v0 is None)
        assert all(t.shape == (B, C) and t.dtype == r.dtype and t.is_contiguous() for t in (r, k, v, w_lora, a_lora, g, v_first))
        f = lambda t: t.float()  # noqa: E731
        r, k, v = f(r), f(k), f(v)
        decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(f(w0) + f(w_lora)))
        a = torch.sigmoid(f(a0) + f(a_lora))
        kk = F.normalize((k * f(k_k)).view(B, H, N), dim=-1)
        k = k * (1 + (a - 1) * f(k_a))
        if v0 is not None:
            v = torch.lerp(v, f(v_first), torch.sigmoid(f(v0) + f(v_lora)))
        heads = (B, 1, H, N)
        y, kv = TorchBackend(Placement(r.device, torch.float32)).wkv(
            kv, r.view(heads), decay.view(heads), k.view(heads), v.view(heads), kk.view(heads), a.view(heads)
        )
        y = F.group_norm(y.view(B, C), H, f(ln_w), f(ln_b), eps)
        bonus = (r * k * f(r_k)).view(B, H, N).sum(-1, keepdim=True) * v.view(B, H, N)
        return ((y + bonus.view(B, C)) * f(g)).to(r_k.dtype), kv

@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8"])
def test_backend_glue_with_reference_ops(model_paths, monkeypatch, dequantized_torch_backend, strategy):
    monkeypatch.setattr(kernels_build, "ops", lambda: ReferenceOps)
    monkeypatch.setattr(CudaBackend, "unavailable_reason", classmethod(lambda cls, placement: None))
    model = RWKV(model_paths["tiny"], strategy, backend="cuda")
    reference = RWKV(model_paths["tiny"], "cpu fp32", backend="torch" if strategy == "cpu fp32" else dequantized_torch_backend)
    assert isinstance(model.stages[0].ops, CudaBackend)
    seq = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(7))
    outs = []
    for m in (model, reference):  # a prefill (GEMM path for int8), then batch-2 decode steps (matvec path)
        out, state = m.forward(seq[:, :20], None)
        for t in range(20, 24):
            out, state = m.forward(seq[:, t : t + 1], state)
        outs.append((out, state.layers[-1].att_kv))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_graphed_decoder_needs_one_cuda_device(model_paths):
    with pytest.raises(StrategyError, match="one CUDA device"):
        GraphedDecoder(RWKV(model_paths["tiny"], "cpu fp32"))


# ---------------------------------------------------------------- GPU: kernels vs the torch backend


def _wkv_inputs(B: int, T: int, H: int, dtype: torch.dtype, seed: int = 0):
    """Inputs shaped like a trained layer's: unit-norm kk, a in (0, 1), decay in (0.54, 1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, T, H, HEAD_SIZE)

    def randn(*s):
        return torch.randn(*s, generator=g, device="cuda")

    r, k, v = randn(*shape), randn(*shape), randn(*shape)
    kk = torch.nn.functional.normalize(randn(*shape), dim=-1)
    a = torch.sigmoid(randn(*shape))
    decay = torch.exp(-0.6065 * torch.sigmoid(randn(*shape) * 2))
    kv = randn(B, H, HEAD_SIZE, HEAD_SIZE) * 0.3
    return kv, r.to(dtype), decay, k.to(dtype), v.to(dtype), kk.to(dtype), a.to(dtype)


@gpu_test
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("B, T", [(1, 1), (2, 37), (1, 300)])
def test_wkv_kernel_matches_torch_scan(dtype, B, T):
    """y to one ulp of the activation dtype; the float32 state to summation order."""
    placement_ = placement(dtype=DTYPES[dtype])
    kv, r, decay, k, v, kk, a = _wkv_inputs(B, T, 3, placement_.dtype)
    kv_before = kv.clone()
    y, kv_out = CudaBackend(placement_).wkv(kv, r, decay, k, v, kk, a)
    y_ref, kv_ref = TorchBackend(placement_).wkv(kv, r, decay, k, v, kk, a)
    assert torch.equal(kv, kv_before), "the kernel must not modify its input state"
    assert y.dtype == placement_.dtype and y.shape == (B, T, 3 * HEAD_SIZE)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=ULP[dtype], atol=ULP[dtype] * y_ref.float().abs().max().item())
    torch.testing.assert_close(kv_out, kv_ref, rtol=1e-5, atol=1e-5 * kv_ref.abs().max().item())


@gpu_test
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rows", [1, 3, MAX_MATVEC_ROWS, MAX_MATVEC_ROWS + 1])
def test_int8_linear_matches_dequantized_reference(dtype, rows):
    """The kernel (≤ 8 rows) and the dequantize+GEMM path (more rows) against float32 math on the
    dequantized weight, to two ulps: one for rounding the output, one for the GEMM path rounding
    the dequantized weight to the activation dtype (its errors mostly cancel over 2048 terms)."""
    g = torch.Generator().manual_seed(rows)
    backend = CudaBackend(placement(dtype=DTYPES[dtype], quant="i8"))
    weight = backend.prepare(torch.randn(1000, 2048, generator=g), Role.MATRIX)
    x = torch.randn(rows, 1, 2048, generator=g).to("cuda", DTYPES[dtype])
    y = backend.linear(x, weight)
    ref = x.float() @ weight.dequantize().T
    tol = 2 * ULP[dtype]
    assert y.shape == (rows, 1, 1000) and y.dtype == DTYPES[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


# Whole model, 200 tokens in two calls, cuda vs torch backend in the same dtype. Per op the two
# agree to an ulp of y (above); through 3 layers of fp16/bf16 math that becomes the drift the
# torch backend itself shows against fp32 (tests/test_gpu.py): ~1e-3 (fp16), ~1e-2 (bf16).
MODEL_TOLERANCE = {"fp32": 2e-5, "fp16": 1e-2, "bf16": 5e-2}


def _two_calls(model, seq):
    _, state = model.forward(seq[:150], None)
    return model.forward(seq[150:], state)


def _close(out, ref, tol):
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max()) < tol


@gpu_test
@pytest.mark.parametrize("dtype", sorted(MODEL_TOLERANCE))
def test_model_matches_torch_backend(model_paths, dtype):
    seq = torch.randint(0, 65536, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    cuda = RWKV(model_paths["world"], f"cuda {dtype}", backend="cuda")
    ref, ref_state = _two_calls(RWKV(model_paths["world"], f"cuda {dtype}", backend="torch"), seq)
    out, state = _two_calls(cuda, seq)
    assert _close(out, ref, MODEL_TOLERANCE[dtype])
    assert _close(state.layers[-1].att_kv, ref_state.layers[-1].att_kv, MODEL_TOLERANCE[dtype] * 5)


@gpu_test
def test_auto_picks_the_kernels_on_a_gpu(model_paths):
    assert isinstance(RWKV(model_paths["tiny"], "cuda fp16").stages[0].ops, CudaBackend)


@gpu_test
def test_int8_model_matches_dequantized_reference(model_paths, dequantized_torch_backend):
    """Same int8-rounded weights both sides; the kernel accumulates in float32 and the reference
    GEMM rounds the dequantized weight to fp16, so the fp16 model tolerance applies."""
    seq = torch.randint(0, 65536, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    out, _ = _two_calls(RWKV(model_paths["world"], "cuda fp16i8", backend="cuda"), seq)
    ref, _ = _two_calls(RWKV(model_paths["world"], "cuda fp16", backend=dequantized_torch_backend), seq)
    assert _close(out, ref, MODEL_TOLERANCE["fp16"])


@gpu_test
@pytest.mark.parametrize("strategy, backend", [("cuda fp16", "cuda"), ("cuda fp16i8", "cuda"), ("cuda fp32", "torch")])
@pytest.mark.parametrize("batch", [1, 2])
def test_graphed_decode_matches_eager_forward(model_paths, strategy, backend, batch):
    """Replaying the graph runs the same kernels on the same data as eager calls, so they agree
    to rounding (cuBLAS may pick another algorithm inside a capture: then the model tolerance of
    the dtype applies); a stale token or state would be off by O(1)."""
    model = RWKV(model_paths["world"], strategy, backend=backend)
    prompt = torch.randint(0, 65536, (batch, 8), generator=torch.Generator().manual_seed(5))
    _, state = model.forward(prompt, None)
    decoder = GraphedDecoder(model, batch, state)
    tol = MODEL_TOLERANCE[strategy.split()[1].removesuffix("i8")]
    tokens = torch.randint(0, 65536, (20, batch), generator=torch.Generator().manual_seed(6))
    for ids in tokens:
        ref, state = model.forward(ids.view(batch, 1), state)
        out = decoder.step(ids.tolist() if batch > 1 else int(ids))
        assert _close(out, ref.view(batch, -1), tol)
    assert _close(decoder.state().layers[-1].att_kv, state.layers[-1].att_kv, tol)
    decoder.reset()
    fresh, _ = model.forward(tokens[0].view(batch, 1), None)
    assert _close(decoder.step(tokens[0].cuda()), fresh.view(batch, -1), tol)



@gpu_test
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("B, layer0", [(1, True), (3, False)])
def test_decode_kernels_match_reference_ops(dtype, B, layer0):
    """Kernel and reference read the same rounded inputs and compute in float32 (the kernel with
    fast exp/sigmoid, ~2 float32 ulp): outputs agree to an ulp or two of the output dtype."""
    ops, dt, g = kernels_build.ops(), DTYPES[dtype], torch.Generator().manual_seed(8)
    H, C = 4, 4 * HEAD_SIZE

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dt)

    def close(got, want, ulps=4):
        tol = ulps * ULP[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())

    mixes = [torch.rand(C, generator=g).to("cuda", dt) for _ in range(6)]
    x, weight, bias, x_prev = rnd(B, C), rnd(C), rnd(C), rnd(B, C)
    for got, want in zip(ops.ln_mix(x, weight, bias, x_prev, mixes, 1e-5), ReferenceOps.ln_mix(x, weight, bias, x_prev, mixes, 1e-5)):
        close(got, want)

    kv = torch.randn(B, H, HEAD_SIZE, HEAD_SIZE, generator=g).cuda() * 0.1
    vectors = [rnd(C) for _ in range(8)]  # w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b
    vectors[2] = None if layer0 else vectors[2]
    loras = [rnd(B, C), rnd(B, C), None if layer0 else rnd(B, C), rnd(B, C)]  # w, a, v, g
    args = (kv, rnd(B, C), rnd(B, C), rnd(B, C), *loras, *vectors, rnd(B, C), 64e-5)
    (y, kv_out), (y_ref, kv_ref) = ops.wkv7_decode(*args), ReferenceOps.wkv7_decode(*args)
    close(y, y_ref, ulps=8)  # GroupNorm divides by the head's spread: a few more ulps
    torch.testing.assert_close(kv_out, kv_ref, rtol=1e-5, atol=1e-5 * kv_ref.abs().max().item())
    assert torch.equal(kv, args[0]) and y.dtype == dt  # the state passed in is only read


@gpu_test
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rows", [1, 3, MAX_MATVEC_ROWS])
def test_grouped_matvec_matches_reference_ops(dtype, rows):
    """One launch over mixed weight formats (int8 with scales, and the activation dtype), every
    epilogue, uneven output sizes; and a single product with a residual. Both sides accumulate in
    float32 from the same inputs and round once."""
    ops, dt, g = kernels_build.ops(), DTYPES[dtype], torch.Generator().manual_seed(11)
    no_scale = torch.empty(0, device="cuda")
    xs, ws, scales = [], [], []
    for i, (n_out, n_in) in enumerate([(70, 256), (5, 128), (33, 64), (256, 32), (1, 512)]):
        xs.append(torch.randn(rows, n_in, generator=g).to("cuda", dt))
        if i % 2 == 0:
            q = quantize_per_channel(torch.randn(n_out, n_in, generator=g))
            ws.append(q.q.cuda()), scales.append(q.scale.cuda())
        else:
            ws.append((torch.randn(n_out, n_in, generator=g) / n_in**0.5).to("cuda", dt)), scales.append(no_scale)
    epilogues = [0, 1, 2, 3, 0]
    for got, want in zip(ops.matvec(xs, ws, scales, epilogues, None), ReferenceOps.matvec(xs, ws, scales, epilogues, None)):
        tol = 4 * ULP[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())
    residual = torch.randn(rows, 70, generator=g).to("cuda", dt)
    got, want = ops.matvec(xs[:1], ws[:1], scales[:1], [0], residual)[0], ReferenceOps.matvec(xs[:1], ws[:1], scales[:1], [0], residual)[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * ULP[dtype], atol=4 * ULP[dtype] * want.float().abs().max().item())

@gpu_test
@pytest.mark.parametrize("strategy", ["cuda fp32", "cuda fp16", "cuda bf16", "cuda fp16i8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_decode_matches_reference_backend(model_paths, dequantized_torch_backend, strategy, batch):
    """30 decode steps through the fused block vs the unfused torch math on the same (int8-rounded
    for fp16i8) weights, each side carrying its own state from the same prefill."""
    reference_backend = dequantized_torch_backend if strategy.endswith("i8") else "torch"
    fused = RWKV(model_paths["world"], strategy, backend="cuda")
    reference = RWKV(model_paths["world"], strategy.removesuffix("i8"), backend=reference_backend)
    prompt = torch.randint(0, 65536, (batch, 16), generator=torch.Generator().manual_seed(9))
    (_, state), (_, ref_state) = fused.forward(prompt, None), reference.forward(prompt, None)
    tol = MODEL_TOLERANCE[strategy.split()[1].removesuffix("i8")]
    for ids in torch.randint(0, 65536, (30, batch, 1), generator=torch.Generator().manual_seed(10)):
        (out, state), (ref, ref_state) = fused.forward(ids, state), reference.forward(ids, ref_state)
        assert _close(out, ref, tol)
    for layer, ref_layer in zip(state.layers, ref_state.layers):
        assert all(_close(t, r, tol * 5) for t, r in zip(layer.tensors(), ref_layer.tensors()))
