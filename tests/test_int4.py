"""4-bit weights (``cpu fp32i4`` / ``cpu bf16i4``): the group-wise format, its row kernel against
dequantize-then-torch, the prefill path, the whole model against fp32, held-out perplexity, the
cache, and strategy strings that are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkvkit import RWKV, StrategyError, quant
from rwkvkit.backend import Epilogue
from rwkvkit.checkpoint import WeightSource
from rwkvkit.errors import InputError
from rwkvkit.native import cpu
from rwkvkit.plugins import int8_cache
from rwkvkit.plugins.int8_backend import Int4Backend
from rwkvkit.quant import GROUP, Int4Weight, Int8Weight, quantize_groupwise, quantize_source
from rwkvkit.strategy import Placement

SHAPES = [(768, 768), (3072, 768), (768, 3072), (65, 130), (5, 7)]  # the 0.1B layer shapes, and odd ones


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, and one all-zero group."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.01, 3, rows)[:, None]
    w[0, : min(cols, GROUP)] = 0
    return w


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_quantization_error_is_at_most_half_a_step_per_weight(rows, cols):
    w = weights(rows, cols)
    q = quantize_groupwise(w)
    step = q.scale.repeat_interleave(GROUP, dim=1)[:, :cols]
    assert q.shape == (rows, cols) and q.codes().abs().max() <= quant.QMAX4
    assert ((q.dequantize() - w).abs() <= step / 2 * (1 + 1e-6)).all()
    # each group's largest weight is exact (to 1 ulp), and the zero group stays zero
    groups = -(-cols // GROUP)
    padded = F.pad(w, (0, groups * GROUP - cols)).view(rows, groups, GROUP).abs().amax(dim=2)
    deq = F.pad(q.dequantize(), (0, groups * GROUP - cols)).view(rows, groups, GROUP).abs().amax(dim=2)
    torch.testing.assert_close(deq, padded, rtol=1e-6, atol=0)
    assert not q.dequantize()[0, : min(cols, GROUP)].any()


def test_quantizing_in_row_blocks_is_bit_identical(monkeypatch):
    monkeypatch.setattr(quant, "BLOCK_BYTES", 4 * 130 * 7)  # 7 rows a block: a short last block
    w = weights(100, 130)
    whole, blocks = quantize_groupwise(w), quantize_source(WeightSource("m", w), Int4Weight.quantize)
    assert isinstance(blocks, Int4Weight) and blocks.cols == 130
    assert torch.equal(blocks.q, whole.q) and torch.equal(blocks.scale, whole.scale)


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_row_kernel_equals_dequantized_product_and_batch_equals_alone(rows, cols):
    """The kernel rounds each input row to int16 steps of max|x|/32767 and sums codes x steps exactly
    in integers per group: per output an error of at most sum|w| * max|x| / 65534 from that
    rounding, plus fp32 rounding of the group sums (1e-5 of sum|w x| covers ~cols/64 additions of
    relative error 6e-8 each). A wrong code, nibble, group or scale is off by order |w x|."""
    g = torch.Generator().manual_seed(1)
    w = quantize_groupwise(torch.randn(rows, cols, generator=g))
    deq = w.dequantize()
    for B in range(1, 9):
        x = torch.randn(B, cols, generator=g)
        y = cpu.project([x], [w], [Epilogue.NONE], None, 2)[0]
        ref = x @ deq.T
        bound = deq.abs().sum(dim=1) * x.abs().amax(dim=1, keepdim=True) / 65534 + 1e-5 * (x.abs() @ deq.abs().T)
        assert ((y - ref).abs() <= bound).all(), (B, float((y - ref).abs().max()))
        alone = torch.cat([cpu.project([x[i : i + 1]], [w], [Epilogue.NONE], None, 2)[0] for i in range(B)])
        assert torch.equal(y, alone)  # a sequence's result does not depend on its batch


def test_row_kernel_refuses_inconsistent_sizes():
    w = quantize_groupwise(torch.randn(64, 130))
    bad = [
        Int4Weight(w.q[:, :-1].contiguous(), w.scale, 130),  # codes a byte short
        Int4Weight(w.q, w.scale[:, :-1].contiguous(), 130),  # a group's scale missing
        Int4Weight(w.q, w.scale, 200),  # more columns than the codes hold
        Int4Weight(w.q, w.scale, 130, group=32),  # groups that are not whole chunks
        Int4Weight(w.q.to(torch.int8), w.scale, 130),
    ]
    for weight in bad:
        with pytest.raises(InputError, match="native kernel input int4"):
            cpu.project([torch.randn(1, weight.cols)], [weight], [Epilogue.NONE], None, 1)


def test_native_dequantize_equals_torch():
    w = quantize_groupwise(weights(65, 130))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(cpu.dequantize_i4(w, dtype), w.dequantize(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_is_a_gemm_on_the_dequantized_weight(dtype):
    """T > 1: the same weight dequantized, one GEMM; only the GEMM's summation order (fp32: 1e-5
    of the largest output) or bf16's output rounding (2^-8) can differ."""
    g = torch.Generator().manual_seed(2)
    w, x = quantize_groupwise(torch.randn(96, 200, generator=g)), torch.randn(1, 7, 200, generator=g).to(dtype)
    y = Int4Backend(Placement(torch.device("cpu"), dtype, quant="i4")).linear(x, w).float()
    ref = F.linear(x.float(), w.dequantize(dtype).float())
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("spec", ["cpu fp32i4", "cpu bf16i4"])
def test_layer_matrices_are_int4_head_and_embedding_int8(model_paths, spec):
    model = RWKV(model_paths["tiny"], spec)
    block = model.stages[0].blocks[0]
    assert [type(s.ops).__name__ for s in model.stages] == ["Int4Backend"]
    assert all(isinstance(m, Int4Weight) for m in (block.att.receptance, block.att.key, block.att.value, block.att.output, block.ffn.key, block.ffn.value))
    assert isinstance(model.head.head, Int8Weight) and isinstance(model.emb, Int8Weight)


@pytest.mark.parametrize("spec", ["cpu fp32i4", "cpu bf16i4"])
def test_logits_cosine_vs_fp32_over_a_200_token_run(spec):
    """On the trained demo model (random weights are far from Gaussian-per-group in a way that says
    nothing): prefill 150 tokens through the GEMM path, then 50 decode steps through the int4 row
    kernel; mean cosine similarity of the logits vs fp32. Measured ~0.994 for both; int8: ~0.9999.
    A wrong nibble order or group scale drops it below 0.9."""
    from importlib import resources
    from pathlib import Path

    path = Path(str(resources.files("rwkvkit.demo") / "demo.pth"))
    seq = torch.randint(0, 4096, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    ref, quantized = RWKV(path, "cpu fp32"), RWKV(path, spec)
    a, sa = ref.forward(seq[:150], None, full_output=True)
    b, sb = quantized.forward(seq[:150], None, full_output=True)
    cos = list(F.cosine_similarity(a.float(), b.float(), dim=-1))
    for t in seq[150:]:
        a, sa = ref.forward([t], sa)
        b, sb = quantized.forward([t], sb)
        cos.append(F.cosine_similarity(a.float(), b.float(), dim=0))
    assert float(torch.stack(cos).mean()) >= 0.98


@pytest.mark.parametrize("spec", ["cpu fp32i4", "cpu bf16i4"])
def test_demo_model_perplexity_within_3_percent_of_fp32(spec):
    """Acceptance: held-out perplexity of the demo model within 3% of fp32's (measured: +0.5%;
    int8 on the same text: +0.06%)."""
    from rwkvkit.quality import demo_perplexity

    assert demo_perplexity(spec) / demo_perplexity("cpu fp32") < 1.03


def forbid_quantizing(monkeypatch):
    def no_quantizing(source, quantize):
        raise AssertionError(f"quantized {source.key} again instead of reading the cache")

    monkeypatch.setattr(int8_cache, "quantize_source", no_quantizing)


def test_second_load_reads_the_cache_in_its_own_folder(model_paths, monkeypatch, private_cache):
    first, _ = RWKV(model_paths["tiny"], "cpu fp32i4").forward([1, 2], None)
    assert [p.name.split("-")[:3] for p in (private_cache / "int4").glob("*.safetensors")] == [["tiny", "0", "2"]]
    assert not (private_cache / "int8").exists()  # int8 entries are another folder's
    forbid_quantizing(monkeypatch)
    second, _ = RWKV(model_paths["tiny"], "cpu bf16i4").forward([1, 2], None)  # entries do not depend on the activation dtype
    third, _ = RWKV(model_paths["tiny"], "cpu fp32i4").forward([1, 2], None)
    assert torch.equal(first, third)
    torch.testing.assert_close(first, second.float(), rtol=0.05, atol=0.05 * float(first.abs().max()))  # bf16 activations


@pytest.mark.parametrize("damage", ["garbage", "int8 codes", "short scales", "negative scale"])
def test_a_damaged_entry_is_quantized_again(model_paths, private_cache, damage):
    from safetensors.torch import load_file, save_file

    first, _ = RWKV(model_paths["tiny"], "cpu fp32i4").forward([1, 2], None)
    (entry,) = (private_cache / "int4").glob("*.safetensors")
    if damage == "garbage":
        entry.write_bytes(b"garbage")
    else:
        tensors = {k: v.clone() for k, v in load_file(str(entry)).items()}
        key = "blocks.0.att.key.weight"
        q, scale = tensors[f"{key}.q"], tensors[f"{key}.scale"]
        if damage == "int8 codes":  # an int8 weight of the same shape where int4 is expected
            tensors[f"{key}.q"], tensors[f"{key}.scale"] = torch.zeros(q.shape[0], q.shape[1] * 2, dtype=torch.int8), scale[:, 0].contiguous()
        elif damage == "short scales":
            tensors[f"{key}.scale"] = scale[:, :-1].contiguous() if scale.shape[1] > 1 else scale[:-1].contiguous()
        else:
            tensors[f"{key}.scale"] = -scale
        save_file(tensors, str(entry))
    again, _ = RWKV(model_paths["tiny"], "cpu fp32i4").forward([1, 2], None)
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cpu fp16i4", "int4: the CPU has no fast fp16 arithmetic: use 'cpu fp32i4' or 'cpu bf16i4'"),
        ("cuda fp16i4", r"cuda fp16i4 is not built yet; 4-bit weights run on the CPU \('cpu fp32i4', 'cpu bf16i4'\)"),
        ("cpu fp32i4 *1 -> cuda:1 bf16i4", "cuda:1 bf16i4 is not built yet"),
        ("cpu fp32i16", "cannot parse stage 'cpu fp32i16'"),
    ],
)
def test_bad_strategies_are_refused_clearly(model_paths, spec, message):
    with pytest.raises(StrategyError, match=message):
        RWKV(model_paths["tiny"], spec)


def test_an_int4_model_keeps_no_mapping_of_its_checkpoint(model_paths):
    """As int8 (tests/test_int8_memory.py): every weight quantized or copied, cold and warm cache."""
    import gc
    from pathlib import Path

    for _ in range(2):
        model = RWKV(model_paths["world"], "cpu fp32i4")
        gc.collect()
        assert str(model_paths["world"]) not in Path("/proc/self/maps").read_text()
        del model


@pytest.mark.slow
def test_int4_peak_memory_is_below_fp32s_cold_and_warm(model_paths, tmp_path, request):
    """Load + 64-token prefill + 2 decode steps in fresh processes on the world-shaped fixture, as
    int8's test: quantizing streams the checkpoint in row blocks, so the peak stays below fp32's by
    at least half fp32's weights (the prefill's dequantized operand is one layer matrix at a time)."""
    import shutil

    from rwkvkit.testing import measure_memory

    cache, probe = tmp_path / "probe-cache", {"prefill": 64, "decode": 2}
    shutil.copytree(request.config._rwkvkit_cache, cache, ignore=shutil.ignore_patterns("int8", "int4"))
    fp32 = measure_memory(model_paths["world"], "cpu fp32", cache, **probe)
    for state in ("cold", "warm"):
        int4 = measure_memory(model_paths["world"], "cpu fp32i4", cache, **probe)
        assert int4["peak_end"] < fp32["peak_end"] - 0.5 * fp32["weights"], (state, int4, fp32)
        assert int4["rss_end"] < fp32["rss_end"] - 0.5 * fp32["weights"], (state, int4, fp32)
