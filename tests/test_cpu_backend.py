"""The ``cpu`` backend: selection, its kernels against the torch backend, and its fallback.
(Oracle parity for it runs in test_oracle_parity.py, parametrized over backends.)"""

from __future__ import annotations

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.plugins import cpu_backend
from rwkvkit.plugins.cpu_backend import CpuBackend
from rwkvkit.plugins.torch_backend import TorchBackend
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
    monkeypatch.setattr(cpu_backend, "library", lambda: None)
    out, _ = RWKV(model_paths["tiny"], "cpu fp32", backend="cpu").forward([1, 2, 3], None)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("spec, backend, tol", [("cpu fp32", "cpu", 2e-5), ("cpu fp32i8", "int8", 1e-4), ("cpu bf16", "cpu", 0.03), ("cpu bf16i8", "int8", 0.03)])
def test_fused_decode_matches_the_python_math(model_paths, monkeypatch, spec, backend, tol):
    """The native one-token block against rwkv7.block on the same prepared weights. fp32: same
    math, only summation order differs (2e-5 as for the oracle). int8: both paths share the int8
    kernel, which rounds x to int16 steps of max|x|/32767; fp32-level differences in x can move an
    element across a step, so 1e-4 (measured 3e-5). bf16: the
    fused kernel computes activations in fp32 where the Python path rounds each op to bf16 (2^-9),
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
    monkeypatch.setattr(CpuBackend, "block", TorchBackend.block)
    ref, ref_state = run()
    assert float((fused - ref).abs().max() / ref.abs().max()) < tol
    kv, ref_kv = fused_state.layers[-1].att_kv, ref_state.layers[-1].att_kv
    assert float((kv - ref_kv).abs().max() / ref_kv.abs().max()) < tol * 5
    assert fused_state.layers[0].att_x_prev.dtype == ref_state.layers[0].att_x_prev.dtype
