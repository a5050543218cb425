"""The int8 backend: quantization error, its kernel, logits quality, mixed stages, memory, cache."""

from __future__ import annotations

import pytest
import torch

from rwkvkit import RWKV, StrategyError
from rwkvkit.models import rwkv7
from rwkvkit.plugins import int8_cache
from rwkvkit.plugins.int8_backend import Int8Backend
from rwkvkit.quant import quantize_per_channel
from rwkvkit.strategy import Placement
from rwkvkit.testing import make_checkpoint


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "cache"))


def test_quantization_error_is_at_most_half_a_step_per_row():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 300)[:, None]
    q = quantize_per_channel(w)
    err = (q.dequantize() - w).abs().amax(dim=1)
    assert (err <= q.scale / 2 * (1 + 1e-5)).all()
    torch.testing.assert_close(q.dequantize().abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)  # extremes kept (to 1 ulp)


@pytest.mark.parametrize("rows, cols", [(768, 768), (3072, 768), (768, 3072), (65, 130), (5, 7)])
def test_gemv_kernel_equals_dequantized_product(rows, cols):
    """Same int8 codes and scales both ways. The VNNI kernel also rounds x to int16 steps of
    max|x|/32767: per output an error of at most sum|q*scale| * max|x|/65534, measured ~2e-5 of
    the output scale for these shapes; a wrong code, scale or row gives errors of order 1."""
    g = torch.Generator().manual_seed(1)
    w, x = quantize_per_channel(torch.randn(rows, cols, generator=g)), torch.randn(1, 1, cols, generator=g)
    y = Int8Backend(Placement(torch.device("cpu"), torch.float32, quant="i8")).linear(x, w)
    ref = torch.nn.functional.linear(x, w.dequantize())
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("spec", ["cpu fp32i8", "cpu bf16i8"])
def test_logits_cosine_vs_fp32_over_300_tokens(model_paths, spec):
    """Acceptance: mean cosine similarity of logits vs fp32 >= 0.999 on a random World-shaped
    model over a 300-token run (prefill 200 through the GEMM path, then 100 decode steps through
    the int8 kernel). Measured: ~0.99996."""
    seq = torch.randint(0, 65536, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    ref, quant = RWKV(model_paths["world"], "cpu fp32"), RWKV(model_paths["world"], spec)
    a, sa = ref.forward(seq[:200], None, full_output=True)
    b, sb = quant.forward(seq[:200], None, full_output=True)
    cos = list(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    for t in seq[200:]:
        a, sa = ref.forward([t], sa)
        b, sb = quant.forward([t], sb)
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert len(cos) == 300 and float(torch.stack(cos).mean()) >= 0.999


def test_resident_weights_under_a_third_of_fp32(tmp_path):
    path = make_checkpoint(tmp_path / "m.pth", n_layer=2, n_embd=256, vocab_size=65536)
    ratio = RWKV(path, "cpu fp32i8").weight_bytes() / RWKV(path, "cpu fp32").weight_bytes()
    assert ratio <= 0.3


def test_mixed_stages_equal_each_stage_alone(model_paths):
    """`cpu fp32i8 *1 -> cpu fp32`: layer 0 as the all-int8 model computes it, the rest as the
    fp32 model computes them from that layer's output."""
    split = RWKV(model_paths["world"], "cpu fp32i8 *1 -> cpu fp32")
    int8, fp32 = RWKV(model_paths["world"], "cpu fp32i8"), RWKV(model_paths["world"], "cpu fp32")
    assert [type(s.ops).__name__ for s in split.stages] == ["Int8Backend", "CpuBackend"]
    tokens = torch.tensor([[1, 2, 3, 4]])
    out, state = split.forward(tokens, None)

    zero = int8.zero_state()
    i8 = int8.stages[0]
    x = i8.ops.embed(int8.emb, tokens)
    x, v_first, layer0 = rwkv7.block(i8.ops, i8.blocks[0], x, None, zero.layers[0])  # over the backend's ops
    f = fp32.stages[0]
    for i in range(1, fp32.spec.n_layer):
        x, v_first, _ = rwkv7.block(f.ops, f.blocks[i], x, v_first, zero.layers[i])
    expected = rwkv7.head(f.ops, fp32.head, x[:, -1]).float()
    assert torch.equal(state.layers[0].att_kv, layer0.att_kv)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_second_load_reads_the_cache(model_paths, monkeypatch):
    first, _ = RWKV(model_paths["tiny"], "cpu fp32i8").forward([1, 2], None)

    def no_quantizing(source):
        raise AssertionError(f"quantized {source.key} again instead of reading the cache")

    monkeypatch.setattr(int8_cache, "quantize_source", no_quantizing)
    second, _ = RWKV(model_paths["tiny"], "cpu fp32i8").forward([1, 2], None)
    assert torch.equal(first, second)


def test_damaged_cache_entry_is_rebuilt(model_paths, tmp_path):
    first, _ = RWKV(model_paths["tiny"], "cpu fp32i8").forward([1, 2], None)
    for entry in (tmp_path / "cache" / "int8").glob("*.safetensors"):
        entry.write_bytes(b"garbage")
    again, _ = RWKV(model_paths["tiny"], "cpu fp32i8").forward([1, 2], None)
    assert torch.equal(first, again)


def test_cpu_fp16i8_is_refused_with_the_alternatives(model_paths):
    with pytest.raises(StrategyError, match="int8: the CPU has no fast fp16 arithmetic: use 'cpu fp32i8' or 'cpu bf16i8'"):
        RWKV(model_paths["tiny"], "cpu fp16i8")


@pytest.mark.parametrize("spec", ["cpu fp32i8", "cpu bf16i8"])
def test_demo_model_perplexity_within_1_5_percent_of_fp32(spec):
    """Acceptance on the trained demo model (random weights cannot show quality loss): held-out
    perplexity of the int8 strategies within 1.5% of fp32's."""
    from rwkvkit.quality import demo_perplexity

    assert demo_perplexity(spec) / demo_perplexity("cpu fp32") < 1.015


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_int8_gemm_is_exact_on_rounded_activations(dtype):
    """T > 1: activations rounded to int8 per row, one integer GEMM. Against the same rounding done
    in torch the products are exact integers, so only the final scaling's float rounding differs
    (bf16: the output's rounding, 2^-8 of its magnitude); against unrounded activations each output
    is off by at most half a step of its row times the weight row's absolute sum."""
    g = torch.Generator().manual_seed(2)
    w, x = quantize_per_channel(torch.randn(96, 200, generator=g)), torch.randn(1, 7, 200, generator=g).to(dtype)
    y = Int8Backend(Placement(torch.device("cpu"), dtype, quant="i8")).linear(x, w).float()
    assert y.shape == (1, 7, 96)
    x2 = x.float().view(7, 200)
    step = x2.abs().amax(dim=1, keepdim=True) / 127
    rounded = torch.round(x2 / step) * step
    same_rounding = rounded @ w.dequantize().T
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.view(7, 96), same_rounding, rtol=tol, atol=tol * float(same_rounding.abs().max()))
    bound = step / 2 * w.dequantize().abs().sum(dim=1) * (1 + tol) + tol * float(same_rounding.abs().max())
    assert ((y.view(7, 96) - x2 @ w.dequantize().T).abs() <= bound).all()
