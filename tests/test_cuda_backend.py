"""The ``cuda`` backend (kernels/), int8 quantization and CUDA-graph decoding.

The first half runs anywhere: Python glue, fallbacks and messages, and the backend's ops on
``ReferenceOps`` (the kernels' contract in torch). The ``gpu`` half checks every op against its
torch default on a CUDA device (the kernels' own tests), then whole models; it is skipped with a
reason elsewhere, and ``benchmarks/gpu_check.sh`` runs it on a lent GPU machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rwkvkit import RWKV, StrategyError, kernels_build
from rwkvkit.backend import Backend, Epilogue, Role
from rwkvkit.cli import main
from rwkvkit.cuda_graphs import GraphedDecoder
from rwkvkit.engine import Engine, Request
from rwkvkit.hookspecs import hookimpl
from rwkvkit.kernels_build import KernelBuildError, build_dir, ops, toolchain_problem
from rwkvkit.model import select_backend
from rwkvkit.models import rwkv7
from rwkvkit.plugins.cuda_backend import HEAD_SIZE, LORA_ALIGN, MATVEC_TEAMS, MAX_MATVEC_GROUP, MAX_MATVEC_ROWS, MAX_MIXES, CudaBackend
from rwkvkit.plugins.samplers import GreedySampler
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.quant import QMAX, Int8Weight, quantize_per_channel
from rwkvkit.registry import registry
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.strategy import Placement
from rwkvkit.testing import make_checkpoint

HAS_CUDA = torch.cuda.is_available()
no_cuda_here = pytest.mark.skipif(HAS_CUDA, reason="checks the messages of a machine without a CUDA device")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# One ulp of the output dtype: kernel and reference read the same rounded inputs, compute in
# float32 and differ only in summation order (~1e-6 relative, hence 1e-5 for fp32) before the
# output is rounded once, so a value may land one ulp apart.
ULP = {"fp32": 1e-5, "fp16": 2**-10, "bf16": 2**-7}


GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine; GPU paths are exercised on a lent GPU machine (benchmarks/gpu_check.sh)"),
]


def gpu_test(fn):
    for mark in GPU:
        fn = mark(fn)
    return fn


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


def test_the_kernels_limits_match_the_backends_copy():
    header = resources.files("rwkvkit.kernels").joinpath("rwkvkit_cuda.h").read_text()
    limits = {"kHeadSize": HEAD_SIZE, "kMaxMatvecRows": MAX_MATVEC_ROWS, "kMaxMatvecGroup": MAX_MATVEC_GROUP, "kMaxMixes": MAX_MIXES}
    assert {name: int(re.search(rf"{name} = (\d+);", header)[1]) for name in limits} == limits
    teams = re.search(r"kMatvecTeams\[\] = \{([\d, ]+)\};", header)[1]
    assert tuple(int(t) for t in teams.split(",")) == MATVEC_TEAMS


def test_the_kernels_hold_no_constant_of_the_math():
    """Norm epsilons, the decay scale and the removal key's floor reach the kernels as arguments
    from rwkv7.constants(); a literal copy in a CUDA source would not follow a change there."""
    kernels = resources.files("rwkvkit.kernels")
    sources = {name: kernels.joinpath(name).read_text() for name in ("decode.cu", "matvec.cu", "wkv7.cu", "rwkvkit_ops.cpp", "rwkvkit_cuda.h")}
    for name, text in sources.items():
        assert not re.search(r"0\.6065|1e-12|64e-5|1e-5|exp\(-0\.5|expf\(-0\.5", text), name


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
    def matvec(xs, ws, scales, epilogues, residual, team=0):
        assert 1 <= len(xs) == len(ws) == len(scales) == len(epilogues) <= MAX_MATVEC_GROUP and (residual is None or len(xs) == 1)
        assert team in (0, *MATVEC_TEAMS)
        lead = xs[0].shape[:-1]
        assert 1 <= lead.numel() <= MAX_MATVEC_ROWS
        ys = []
        for x, w, scale, epilogue in zip(xs, ws, scales, epilogues):
            assert x.shape == (*lead, w.shape[1]) and x.is_contiguous() and w.is_contiguous()
            assert x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0  # 16-byte loads
            int8 = scale.numel() > 0
            assert w.dtype == (torch.int8 if int8 else x.dtype) and (not int8 or (scale.dtype == torch.float32 and scale.shape == w.shape[:1]))
            assert w.shape[1] % (16 if int8 else 16 // x.element_size()) == 0
            y = x.float() @ w.float().T * (scale if int8 else 1)
            y = [y, torch.tanh(y), torch.sigmoid(y), torch.relu(y) ** 2][epilogue]
            if residual is not None:
                assert residual.shape == y.shape and residual.dtype == x.dtype and residual.is_contiguous()
                y = y + residual.float()
            ys.append(y.to(x.dtype))
        return ys

    @staticmethod
    def ln_mix(x, weight, bias, x_prev, mixes, eps):
        """One token per sequence: x [B, C] or [B, 1, C], x_prev [B, C]."""
        B, C = x_prev.shape
        assert x.numel() == B * C and x.shape[-1] == C and x.is_contiguous() and x_prev.is_contiguous() and 1 <= len(mixes) <= MAX_MIXES
        assert all(t.shape == (C,) and t.dtype == x.dtype for t in (weight, bias, *mixes))
        x_ln = F.layer_norm(x.reshape(B, C).float(), (C,), weight.float(), bias.float(), eps).to(x.dtype)
        base = x_ln.float()
        mixed = torch.stack([base + (x_prev.float() - base) * m.float() for m in mixes]).to(x.dtype)
        return x_ln, mixed.view(len(mixes), *x.shape)

    @staticmethod
    def wkv7_decode(kv, r, k, v, w_lora, a_lora, v_lora, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, v_first, group_norm_eps, decay_scale, kk_eps):
        """Backend.time_mix_core for one token, in float32, the constants as passed: r and the other
        token tensors [B, C] or [B, 1, C]."""
        shape, C = r.shape, r.shape[-1]
        B, H, N = r.numel() // C, C // HEAD_SIZE, HEAD_SIZE
        assert kv.shape == (B, H, N, N) and kv.dtype == torch.float32 and (v_lora is None) == (v0 is None)
        tokens = [t for t in (r, k, v, w_lora, a_lora, v_lora, g, v_first) if t is not None]
        assert all(t.shape == shape and t.dtype == r.dtype and t.is_contiguous() for t in tokens)
        assert all(isinstance(c, float) for c in (group_norm_eps, decay_scale, kk_eps))
        f = lambda t: t.float().reshape(-1, C) if t.dim() > 1 else t.float()  # noqa: E731
        r, k, v = f(r), f(k), f(v)
        decay = torch.exp(-decay_scale * torch.sigmoid(f(w0) + f(w_lora)))
        a = torch.sigmoid(f(a0) + f(a_lora))
        kk = F.normalize((k * f(k_k)).view(B, H, N), dim=-1, eps=kk_eps)
        k = k * (1 + (a - 1) * f(k_a))
        if v0 is not None:
            v = torch.lerp(v, f(v_first), torch.sigmoid(f(v0) + f(v_lora)))
        heads = (B, 1, H, N)
        y, kv = TorchBackend(Placement(r.device, torch.float32)).wkv(
            kv, r.view(heads), decay.view(heads), k.view(heads), v.view(heads), kk.view(heads), a.view(heads)
        )
        y = F.group_norm(y.view(B, C), H, f(ln_w), f(ln_b), group_norm_eps)
        bonus = (r * k * f(r_k)).view(B, H, N).sum(-1, keepdim=True) * v.view(B, H, N)
        return ((y + bonus.view(B, C)) * f(g)).to(r_k.dtype).view(shape), kv


class CountingOps:
    """``ReferenceOps`` counting the calls (kernel launches) of each op."""

    def __init__(self) -> None:
        self.launches: Counter[str] = Counter()

    def __getattr__(self, name: str):
        op = getattr(ReferenceOps, name)

        def launch(*args):
            self.launches[name] += 1
            return op(*args)

        return launch


@pytest.fixture
def reference_kernels(monkeypatch) -> CountingOps:
    """The cuda backend on ``ReferenceOps`` for any placement, so its glue runs on this machine."""
    counting = CountingOps()
    monkeypatch.setattr(kernels_build, "ops", lambda: counting)
    monkeypatch.setattr(CudaBackend, "unavailable_reason", classmethod(lambda cls, placement: None))
    return counting


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8"])
def test_backend_glue_with_reference_ops(model_paths, reference_kernels, dequantized_torch_backend, strategy):
    model = RWKV(model_paths["tiny"], strategy, backend="cuda")
    reference = RWKV(model_paths["tiny"], "cpu fp32", backend="torch" if strategy == "cpu fp32" else dequantized_torch_backend)
    assert isinstance(model.stages[0].ops, CudaBackend)
    seq = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(7))
    outs = []
    for m in (model, reference):  # a prefill (the torch defaults; GEMM for int8), then batch-2 decode steps (the kernels)
        out, state = m.forward(seq[:, :20], None)
        for t in range(20, 24):
            out, state = m.forward(seq[:, t : t + 1], state)
        outs.append((out, state.layers[-1].att_kv))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8"])
def test_a_decoded_layer_is_nine_launches(model_paths, reference_kernels, strategy):
    """ln_mix, R/K/V, LoRA downs, LoRA ups, wkv7_decode, output + residual, ln_mix, FFN key, FFN
    value + residual (as the module docstring counts them); the head is one matvec more."""
    model = RWKV(model_paths["tiny"], strategy, backend="cuda")
    _, state = model.forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), None)
    reference_kernels.launches.clear()
    model.forward(torch.tensor([[7], [8]]), state)
    layers = model.spec.n_layer
    assert reference_kernels.launches == {"ln_mix": 2 * layers, "matvec": 6 * layers + 1, "wkv7_decode": layers}


@pytest.mark.parametrize("rows", [2, 32])
def test_lora_factors_are_laid_out_once_for_matvec(reference_kernels, rows):
    """Prepared ``[rank padded, in]`` / ``[out, rank padded]`` with zero padding that adds nothing
    (a padded sigmoid row gives 0.5, which meets a zero column): the two matvec launches (2 rows)
    and the torch fallback (32 rows) on that layout equal the torch default on the checkpoint's."""
    cpu = Placement(torch.device("cpu"), torch.float32)
    cuda, reference = CudaBackend(cpu), TorchBackend(cpu)
    g = torch.Generator().manual_seed(2)
    ranks = [56, 60, 120, 24]  # decay, rate, gate, value residual: each one padded
    factors = [(torch.randn(768, rank, generator=g), torch.randn(rank, 768, generator=g)) for rank in ranks]
    acts = [Epilogue.TANH, Epilogue.NONE, Epilogue.SIGMOID, Epilogue.NONE]
    ours = [(cuda.prepare(a, Role.LORA_IN), cuda.prepare(b, Role.LORA_OUT), e) for (a, b), e in zip(factors, acts)]
    for (down, up, _), rank in zip(ours, ranks):
        padded = -(-rank // LORA_ALIGN) * LORA_ALIGN
        assert down.shape == (padded, 768) and up.shape == (768, padded) and down.is_contiguous() and up.is_contiguous()
        assert not down[rank:].any() and not up[:, rank:].any()
    xs = [torch.randn(rows, 1, 768, generator=g) for _ in ranks]
    got = cuda.lora(xs, ours)
    plain = [(reference.prepare(a, Role.LORA_IN), reference.prepare(b, Role.LORA_OUT), e) for (a, b), e in zip(factors, acts)]
    want = Backend.lora(reference, xs, plain)
    assert reference_kernels.launches["matvec"] == (2 if rows <= MAX_MATVEC_ROWS else 0)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_graphed_decoder_needs_one_cuda_device(model_paths):
    with pytest.raises(StrategyError, match="one CUDA device"):
        GraphedDecoder(RWKV(model_paths["tiny"], "cpu fp32", backend="torch"))


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
    decay = torch.exp(-rwkv7.DECAY_SCALE * torch.sigmoid(randn(*shape) * 2))
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


# ---------------------------------------------------------------- GPU: each op against its torch default

C, H, F_DIM = 768, 12, 3072  # the 0.1B shape (12 heads of 64); LoRA ranks 64/64/32/128
OP_STRATEGIES = ["cuda fp32", "cuda fp16", "cuda bf16"]


@pytest.fixture(scope="module")
def shape_0_1b(tmp_path_factory):
    """``load(strategy, backend)``: two layers of the 0.1B shape (layer 1 with the value-residual
    LoRA) and a small vocabulary, each model loaded once per module."""
    path = make_checkpoint(tmp_path_factory.mktemp("ops") / "m.pth", n_layer=2, n_embd=C, vocab_size=1024, seed=5)
    models: dict[tuple[str, str], RWKV] = {}

    def load(strategy: str, backend: str = "cuda") -> RWKV:
        if (strategy, backend) not in models:
            models[strategy, backend] = RWKV(path, strategy, backend=backend)
        return models[strategy, backend]

    return load


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale."""
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to("cuda", dtype)


def _defaults(fn, dtype: torch.dtype) -> tuple:
    """``fn(ops, cast)`` on the torch defaults in ``dtype``, and in float32 on the same (rounded) values."""
    cuda = torch.device("cuda")
    ref = fn(TorchBackend(Placement(cuda, dtype)), lambda t: t)
    exact = fn(TorchBackend(Placement(cuda, torch.float32)), lambda t: None if t is None else t.float())
    return ref, exact


def _assert_like_default(got, ref, exact, dtype: torch.dtype, tol32: float) -> None:
    """Each output against the op's torch default, shape and dtype exactly. fp32: the same math in
    another summation order (and fast exp/sigmoid): ``tol32`` of the output's scale. fp16/bf16: the
    kernels compute in float32 and round once, where the default rounds after every torch op, so
    both are held to the default run in float32 on the same rounded inputs (``exact``): the kernel
    must be no less accurate than the default (1.5x its error) plus one ulp of the dtype for its own
    rounding. A wrong constant, mix or layout is off by O(1) either way."""
    assert len(got) == len(ref) == len(exact)
    ulp = torch.finfo(dtype).eps  # one ulp at 1: 2^-10 (fp16), 2^-7 (bf16)
    for a, b, e in zip(got, ref, exact):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        if dtype == torch.float32:
            assert _rel(a, b) < tol32
        else:
            assert _rel(a, e) <= 1.5 * _rel(b, e) + ulp, (_rel(a, e), _rel(b, e))


def _weights(model: RWKV, layer: int):
    """``(ops, block weights)`` of a layer of a one-stage model."""
    return model.stages[0].ops, model.stages[0].blocks[layer]


@gpu_test
@pytest.mark.parametrize("strategy", OP_STRATEGIES)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 1), (3, 16)])
def test_ln_mix_op(shape_0_1b, strategy, B, T):
    """The time mix's six vectors in the architecture's order and the channel mix's one."""
    ops, w = _weights(shape_0_1b(strategy), 1)
    dtype = ops.placement.dtype
    x, prev = _randn(B, T, C, dtype=dtype, seed=B + T, scale=2.0), _randn(B, C, dtype=dtype, seed=7, scale=2.0)
    for mixes in ([getattr(w.att, m) for m in rwkv7.ATT_MIXES], [w.ffn.x_k]):
        last, mixed = ops.ln_mix(x, w.ln1_weight, w.ln1_bias, prev, mixes, rwkv7.LN_EPS)

        def default(ref, cast, mixes=mixes):
            last, mixed = Backend.ln_mix(ref, cast(x), cast(w.ln1_weight), cast(w.ln1_bias), cast(prev), [cast(m) for m in mixes], rwkv7.LN_EPS)
            return [last, *mixed]

        _assert_like_default([last, *mixed], *_defaults(default, dtype), dtype, 2e-5)


@gpu_test
@pytest.mark.parametrize("strategy", [*OP_STRATEGIES, "cuda fp16i8"])
@pytest.mark.parametrize("B, T", [(1, 1), (3, 1), (3, 16)])
def test_project_op(shape_0_1b, strategy, B, T):
    """R/K/V in one group with three epilogues, the FFN key (relu²), the FFN value with the
    residual; int8 weights against the defaults on their dequantized values."""
    ops, w = _weights(shape_0_1b(strategy), 1)
    dtype = ops.placement.dtype
    xr, xk, xv, res = (_randn(B, T, C, dtype=dtype, seed=10 * i + B + T) for i in range(4))
    hidden = _randn(B, T, F_DIM, dtype=dtype, seed=B + T, scale=0.5)
    mats = [w.att.receptance, w.att.key, w.att.value, w.ffn.key, w.ffn.value]
    epilogues = [Epilogue.NONE, Epilogue.TANH, Epilogue.SIGMOID]
    got = [
        *ops.project([xr, xk, xv], mats[:3], epilogues),
        *ops.project([xk], mats[3:4], [Epilogue.RELU_SQUARE]),
        *ops.project([hidden], mats[4:], residual=res),
    ]

    def default(ref, cast):
        plain = [cast(m.dequantize() if isinstance(m, Int8Weight) else m).to(ref.placement.dtype) for m in mats]
        return [
            *Backend.project(ref, [cast(xr), cast(xk), cast(xv)], plain[:3], epilogues),
            *Backend.project(ref, [cast(xk)], plain[3:4], [Epilogue.RELU_SQUARE]),
            *Backend.project(ref, [cast(hidden)], plain[4:], residual=cast(res)),
        ]

    _assert_like_default(got, *_defaults(default, dtype), dtype, 2e-5)


def _lora_pairs(att, layer: int) -> list[tuple]:
    """The LoRA pairs rwkv7.time_mix passes (decay, rate, gate; the value residual after layer 0)."""
    pairs = [(att.w1, att.w2, Epilogue.TANH), (att.a1, att.a2, Epilogue.NONE), (att.g1, att.g2, Epilogue.SIGMOID)]
    return pairs + [(att.v1, att.v2, Epilogue.NONE)] if layer else pairs


@gpu_test
@pytest.mark.parametrize("strategy", OP_STRATEGIES)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 1), (3, 16)])
@pytest.mark.parametrize("layer", [0, 1])
def test_lora_op(shape_0_1b, strategy, B, T, layer):
    """The cuda backend's factors (transposed, rank padded) against the torch backend's, same values."""
    ops, w = _weights(shape_0_1b(strategy), layer)
    _, plain = _weights(shape_0_1b(strategy, "torch"), layer)
    dtype = ops.placement.dtype
    xs = [_randn(B, T, C, dtype=dtype, seed=10 * i + B + T + layer) for i in range(3 + layer)]
    got = ops.lora(xs, _lora_pairs(w.att, layer))

    def default(ref, cast):
        return Backend.lora(ref, [cast(x) for x in xs], [(cast(a), cast(b), e) for a, b, e in _lora_pairs(plain.att, layer)])

    _assert_like_default(got, *_defaults(default, dtype), dtype, 2e-5)


@gpu_test
@pytest.mark.parametrize("strategy", OP_STRATEGIES)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 1), (3, 16)])
@pytest.mark.parametrize("layer", [0, 1])
def test_time_mix_core_op(shape_0_1b, strategy, B, T, layer):
    """wkv7_decode (T = 1) and the scan kernel under the default (T = 16), at the scales a run
    sees (projections and LoRA outputs ~1, a carried state); the input state is only read. fp32:
    5e-5, as GroupNorm divides each head by its own spread."""
    ops, w = _weights(shape_0_1b(strategy), layer)
    dtype = ops.placement.dtype
    r, k, v, wl, al, g, vl, vf = (_randn(B, T, C, dtype=dtype, seed=10 * i + B + T + layer) for i in range(8))
    vl, vf = (vl, vf) if layer else (None, None)
    kv = _randn(B, H, HEAD_SIZE, HEAD_SIZE, dtype=torch.float32, seed=T, scale=0.3)
    kv_before, c = kv.clone(), rwkv7.constants()
    got = ops.time_mix_core(w.att, kv, r, k, v, wl, al, g, vl, vf, c)

    def default(ref, cast):
        vectors = SimpleNamespace(**{n: cast(getattr(w.att, n)) for n in ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_x_weight", "ln_x_bias")})
        return Backend.time_mix_core(ref, vectors, kv, *(cast(t) for t in (r, k, v, wl, al, g, vl, vf)), c)

    _assert_like_default(list(got), *map(list, _defaults(default, dtype)), dtype, 5e-5)
    assert torch.equal(kv, kv_before), "the input state was modified"


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
@pytest.mark.parametrize("strategy, backend", [("cuda fp16", "cuda"), ("cuda fp32", "torch")])
def test_engine_decodes_through_graphs_by_default(model_paths, strategy, backend):
    """The engine on one GPU captures a graph per batch bucket (5 sequences: buckets 8, 4, 2, 1
    as they finish at different lengths) and gives the tokens of its eager steps; a stale or
    shifted pool row would change a sequence's tokens."""
    model = RWKV(model_paths["world"], strategy, backend=backend)
    tok = resolve_tokenizer("rwkv_vocab_v20230424")
    prompts = [torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 40, 7, 300, 3)]

    def generate(graphs):
        requests = [Request(p, 6 + 5 * i, GreedySampler(), seed=i) for i, p in enumerate(prompts)]
        return [r.tokens for r in Engine(model, tok, max_batch=8, cuda_graphs=graphs).generate(requests)]

    with_graphs = generate(None)
    graphs = model.derived["cuda graphs, max batch 8"]
    assert {1, 2, 4, 8} <= set(graphs._decoders) and all(d.graph is not None for d in graphs._decoders.values())
    assert with_graphs == generate(False)

@gpu_test
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rows", [1, 3, MAX_MATVEC_ROWS])
@pytest.mark.parametrize("team", [0, *MATVEC_TEAMS])
def test_grouped_matvec_matches_reference_ops(dtype, rows, team):
    """One launch over mixed weight formats (int8 with scales, and the activation dtype), every
    epilogue, uneven output sizes (so a warp's teams of 8 straddle two products and the end); and
    a single product with a residual; with each team size and the kernel's own choice. Both sides
    accumulate in float32 from the same inputs and round once."""
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
    for got, want in zip(ops.matvec(xs, ws, scales, epilogues, None, team), ReferenceOps.matvec(xs, ws, scales, epilogues, None)):
        tol = 4 * ULP[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())
    residual = torch.randn(rows, 70, generator=g).to("cuda", dt)
    got, want = ops.matvec(xs[:1], ws[:1], scales[:1], [0], residual, team)[0], ReferenceOps.matvec(xs[:1], ws[:1], scales[:1], [0], residual)[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * ULP[dtype], atol=4 * ULP[dtype] * want.float().abs().max().item())


# (n_out, n_in) of the matrices a decode step streams, 1.5B (C = 2048) and 2.9B (C = 2560): the
# square projections, the FFN key [4C, C] and value [C, 4C], the head [V, C], a LoRA down [rank, C]
# and up [C, rank]; then odd sizes: one chunk per row, a row count no team divides, widths whose
# chunk count no team x unroll divides (2064 = 16 x 129, 4112 = 16 x 257).
REAL_SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192), (65536, 2048), (96, 2048), (2048, 96),
               (2560, 2560), (10240, 2560), (2560, 10240), (65536, 2560), (160, 2560), (2560, 160)]  # fmt: skip
ODD_SHAPES = [(7, 16), (33, 48), (1000, 2064), (3, 4112), (129, 32)]


@gpu_test
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("int8", [False, True], ids=["plain", "int8"])
@pytest.mark.parametrize("team", [0, *MATVEC_TEAMS])
def test_matvec_on_real_shapes(dtype, int8, team):
    """Each team size (and the kernel's own choice) on every decode matrix of the 1.5B and 2.9B
    shapes and on odd sizes, weights int8 or in the activation dtype, 1 and 5 rows, against float32
    math on the same values (ReferenceOps). Up to 10,240 float32 products per output in another
    order: 4 ulps of the dtype (relative to the output's scale) covers the order and the one rounding
    of the output; a wrong index or a lost chunk is off by far more."""
    ops, dt = kernels_build.ops(), DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(13)
    no_scale = torch.empty(0, device="cuda")
    for n_out, n_in in REAL_SHAPES + ODD_SHAPES:
        if int8:
            q = quantize_per_channel(torch.randn(n_out, n_in, generator=g, device="cuda"))
            w, scale = q.q, q.scale
        else:
            w, scale = (torch.randn(n_out, n_in, generator=g, device="cuda") / n_in**0.5).to(dt), no_scale
        for rows in (1, 5):
            x = torch.randn(rows, n_in, generator=g, device="cuda").to(dt)
            got = ops.matvec([x], [w], [scale], [0], None, team)[0]
            want = ReferenceOps.matvec([x], [w], [scale], [0], None)[0]
            tol = 4 * ULP[dtype]
            assert got.shape == (rows, n_out), (n_out, n_in, rows)
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item(), msg=lambda m: f"{(n_out, n_in, rows)}: {m}")


@gpu_test
def test_matvec_refuses_an_unknown_team():
    x, w = torch.ones(1, 16, device="cuda"), torch.ones(4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="team must be 0 .* one of 8, 32, 128"):
        kernels_build.ops().matvec([x], [w], [torch.empty(0, device="cuda")], [0], None, 64)


@gpu_test
@pytest.mark.parametrize("strategy", ["cuda fp32", "cuda fp16", "cuda bf16", "cuda fp16i8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_matches_reference_backend(model_paths, dequantized_torch_backend, strategy, batch):
    """30 decode steps through the kernels' ops vs the torch defaults on the same (int8-rounded
    for fp16i8) weights, each side carrying its own state from the same prefill."""
    reference_backend = dequantized_torch_backend if strategy.endswith("i8") else "torch"
    cuda = RWKV(model_paths["world"], strategy, backend="cuda")
    reference = RWKV(model_paths["world"], strategy.removesuffix("i8"), backend=reference_backend)
    prompt = torch.randint(0, 65536, (batch, 16), generator=torch.Generator().manual_seed(9))
    (_, state), (_, ref_state) = cuda.forward(prompt, None), reference.forward(prompt, None)
    tol = MODEL_TOLERANCE[strategy.split()[1].removesuffix("i8")]
    for ids in torch.randint(0, 65536, (30, batch, 1), generator=torch.Generator().manual_seed(10)):
        (out, state), (ref, ref_state) = cuda.forward(ids, state), reference.forward(ids, ref_state)
        assert _close(out, ref, tol)
    for layer, ref_layer in zip(state.layers, ref_state.layers):
        assert all(_close(t, r, tol * 5) for t, r in zip(layer.tensors(), ref_layer.tensors()))


# ---------------------------------------------------------------- constants passed down

PATCHES = {  # far from the trained values, so each moves the logits clearly
    "GROUP_NORM_EPS": 1.0,
    "DECAY_SCALE": 3.0,
    "LN_EPS": 0.1,
    "ATT_MIXES": ("x_k", "x_w", "x_r", "x_v", "x_a", "x_g"),  # x_r and x_k trade places
}


def _prefill_and_decode(path, strategy: str, backend: str) -> torch.Tensor:
    """Every position's logits of a 12-token prefill of a batch of 2, then those of 6 single-token
    steps of the batch (the kernels' decode shapes)."""
    model = RWKV(path, strategy, backend=backend)
    tokens = torch.randint(0, 2048, (2, 18), generator=torch.Generator().manual_seed(1))
    logits, state = model.forward(tokens[:, :12], None, full_output=True)
    outs = [logits.flatten()]
    for t in range(12, 18):
        logits, state = model.forward(tokens[:, t : t + 1], state)
        outs.append(logits.flatten())
    return torch.cat(outs).cpu()


@pytest.mark.parametrize("constant", PATCHES)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_patched_constants_reach_the_kernels(model_paths, request, monkeypatch, device, constant):
    """The architecture's constants and mix order patched before the load: the cuda backend follows
    the torch backend under the patch, in fp32 to 2e-5 of the logits' scale (as the whole-model
    test: summation order and fast exp over 2 layers and 18 tokens), while the patch itself moves
    the logits by far more (> 1e-2; 6-15% on this model), so a kernel with its own copy of a constant would fail. On
    ``cpu`` the kernels are ReferenceOps, which use the constants they are passed: the backend's
    glue passes the architecture's."""
    if device == "cpu":
        request.getfixturevalue("reference_kernels")
    strategy, path = f"{device} fp32", model_paths["tiny"]
    unpatched = _prefill_and_decode(path, strategy, "torch")
    monkeypatch.setattr(rwkv7, constant, PATCHES[constant])
    ref = _prefill_and_decode(path, strategy, "torch")
    got = _prefill_and_decode(path, strategy, "cuda")
    assert _rel(got, ref) < 2e-5 and _rel(ref, unpatched) > 1e-2, (_rel(got, ref), _rel(ref, unpatched))
