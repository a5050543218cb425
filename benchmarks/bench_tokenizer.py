"""Encode speed of the ``rwkv_world`` tokenizer (C++ and pure-Python encoders) against the reference
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, same run, on 1.1 MB of mixed text from this machine
(Python code, English docs, CJK and other translations, emoji); and its cold load time.

Run: ``pytest benchmarks/bench_tokenizer.py --benchmark-enable -s``; MB/s are in each row's
extra_info (``--benchmark-json out.json`` keeps them) and ``test_speedup`` prints them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkvkit.plugins import rwkv_world
from rwkvkit.plugins.rwkv_world import VOCAB_FILE, RwkvWorldTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the corpus helper lives there
from tokenizer_corpus import machine_text  # noqa: E402

IMPLS = {"reference": 3, "rwkvkit": 10, "rwkvkit-python": 3}  # name -> rounds
MB_PER_S: dict[str, float] = {}


@pytest.fixture(scope="module")
def text() -> str:
    return machine_text(1_100_000)


@pytest.fixture(scope="module")
def encoders():
    return {
        "reference": TRIE_TOKENIZER(str(VOCAB_FILE)).encode,
        "rwkvkit": RwkvWorldTokenizer().encode,
        "rwkvkit-python": RwkvWorldTokenizer(native=False).encode,
    }


@pytest.mark.parametrize("impl", IMPLS)
def test_encode(benchmark, encoders, text, impl):
    benchmark.pedantic(encoders[impl], args=(text,), rounds=IMPLS[impl], warmup_rounds=1)  # warm-up builds the encoder
    if benchmark.stats:  # None under --benchmark-disable
        MB_PER_S[impl] = benchmark.extra_info["MB_per_s"] = len(text.encode()) / benchmark.stats.stats.median / 1e6


def test_load(benchmark):
    """Cold start, caches bypassed: parse the vocab file and build the C++ trie."""

    def load():
        return rwkv_world._NativeEncoder(rwkv_world._native_library(), rwkv_world._load_vocab.__wrapped__(VOCAB_FILE))

    benchmark.pedantic(load, rounds=3, warmup_rounds=1)


def test_speedup():
    """The issue's target: encoding at least 20x the reference's speed."""
    if not {"reference", "rwkvkit"} <= MB_PER_S.keys():
        pytest.skip("needs test_encode's reference and rwkvkit rows, with --benchmark-enable")
    print("\nencode MB/s: " + ", ".join(f"{impl} {speed:.1f}" for impl, speed in MB_PER_S.items()))
    assert MB_PER_S["rwkvkit"] >= 20 * MB_PER_S["reference"]
