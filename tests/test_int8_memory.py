"""The int8 load's memory: quantization streams the checkpoint a row block at a time (bit-identical
to quantizing whole matrices), releases the mapped pages it has read, keeps no view of the file,
and so peaks below fp32's resident memory with a cold or a warm cache (benchmarks/bench_memory.py
measures the 0.1B shape)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from rwkvkit import RWKV, quant
from rwkvkit.checkpoint import WeightSource, load_checkpoint
from rwkvkit.models import rwkv7
from rwkvkit.pages import release
from rwkvkit.quant import quantize_per_channel, quantize_source
from rwkvkit.testing import measure_memory


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rss_file_kb() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssFile")).split()[1])


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_row_blocks_is_bit_identical(monkeypatch, dtype):
    monkeypatch.setattr(quant, "BLOCK_BYTES", 4 * 200 * 7)  # 7 rows a block: a short last block
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(100, 200, generator=g) * torch.linspace(0.01, 3, 100)[:, None]).to(dtype)
    w[5] = 0  # an all-zero row stays zero
    ln0 = (torch.randn(200, generator=g), torch.randn(200, generator=g))
    for source, whole in (
        (WeightSource("m", w), w),
        (WeightSource("emb", w, lambda rows: rwkv7.embed(rows, *ln0, rwkv7.LN_EPS)), rwkv7.embed(w, *ln0, rwkv7.LN_EPS)),
    ):
        expected, got = quantize_per_channel(whole), quantize_source(source)
        assert torch.equal(got.q, expected.q) and torch.equal(got.scale, expected.scale)


def test_release_drops_mapped_pages_and_the_data_reads_the_same(model_paths):
    head = load_checkpoint(model_paths["world"]).tensors["head.weight"]  # 64 MB, memory-mapped
    expected = head.sum(dtype=torch.float64)  # every page read
    before = rss_file_kb()
    assert release(head)
    assert before - rss_file_kb() > 0.9 * head.nbytes / 1024
    assert head.sum(dtype=torch.float64) == expected  # faulted in again from the file


def test_release_leaves_memory_that_is_not_a_file_mapping_alone():
    t = torch.arange(1 << 20, dtype=torch.float32)  # 4 MB of anonymous memory: madvise would zero it
    assert not release(t)
    assert torch.equal(t, torch.arange(1 << 20, dtype=torch.float32))


def test_release_keeps_a_written_page_of_a_private_mapping(model_paths):
    head = load_checkpoint(model_paths["world"]).tensors["head.weight"]
    head[100, 0] = 123.0  # this process's own copy of that page now: dropping it would lose the write
    assert not release(head[:200])
    assert head[100, 0] == 123.0
    assert release(head[1000:2000])  # pages never written are still released


@pytest.mark.parametrize("strategy", ["cpu fp32i8", "cpu bf16i8"])
def test_an_int8_model_keeps_no_mapping_of_its_checkpoint(model_paths, strategy):
    """Every weight is int8 or a copy: one LoRA factor kept as a view of the file would keep the
    whole mapping, and every page quantization read, resident for the model's lifetime."""
    for _ in range(2):  # cold, then warm cache
        model = RWKV(model_paths["world"], strategy)
        gc.collect()
        assert not mapped(model_paths["world"])
        del model


@pytest.mark.slow
def test_int8_peak_memory_is_below_fp32s_cold_and_warm(model_paths, tmp_path, request):
    """Load + 64-token prefill + 2 decode steps in fresh processes, on the world-shaped fixture
    (3 x 256, vocab 65,536; fp32 weights 138 MB, int8 36 MB). Measured: fp32 peak 523 MB, int8
    378 MB cold and 364 MB warm (the code before streaming: 614 and 546 MB)."""
    cache, probe = tmp_path / "probe-cache", {"prefill": 64, "decode": 2}
    shutil.copytree(request.config._rwkvkit_cache, cache, ignore=shutil.ignore_patterns("int8"))  # built kernels, no int8 entries
    fp32 = measure_memory(model_paths["world"], "cpu fp32", cache, **probe)
    for state in ("cold", "warm"):
        int8 = measure_memory(model_paths["world"], "cpu fp32i8", cache, **probe)
        assert int8["peak_end"] < fp32["peak_end"] - 0.5 * fp32["weights"], (state, int8, fp32)
        assert int8["rss_end"] < fp32["rss_end"] - 0.5 * fp32["weights"], (state, int8, fp32)
