"""Which structured-output library: llguidance, xgrammar and outlines-core on rwkvkit's tokenizers.

For each tokenizer (the RWKV World vocabulary: 65,536 ids of raw bytes, 486 of them invalid UTF-8
on their own, 7 empty; the demo model's 4,096-token byte-level BPE) and each library, it measures

- ``setup_ms``: building the library's view of the vocabulary (once per tokenizer);
- ``compile_ms``: compiling one case (once per request; outlines-core builds a full DFA index);
- ``first_ms``: starting a sequence's matcher and its first mask (llguidance compiles lazily, here);
- ``mask_us``: the median cost of one next-token mask over 20 random walks (each step picks a
  uniformly random allowed token, so walks visit many states, partial UTF-8 ones included);
- ``valid``: walks whose bytes satisfy the case (jsonschema / re.fullmatch), out of those that
  finished within 120 tokens; ``utf8``: whether a character written as three single-byte
  tokens (E4 B8 AD) is accepted byte by byte, and a stray continuation byte refused.

outlines-core has no context-free grammars (regex and JSON schema as a regex only), so the
``grammar`` row (validated by the ``lark`` package's parser) exists for llguidance (Lark) and
xgrammar (the same language in GBNF) only.

Run: ``python benchmarks/bench_constraint_libraries.py`` (needs ``pip install llguidance xgrammar
outlines-core``; a few minutes).

Measured (llguidance 1.9.1, xgrammar 0.2.9, outlines-core 0.2.14; a shared, loaded 2-core machine):

=========  =============  ========  ==============  ==========  ===========================
vocab      library        setup ms  compile ms      mask us     valid walks (of finished)
=========  =============  ========  ==============  ==========  ===========================
world      llguidance     402       ~0 (+0.6-1.6    13-53       all 120/120; utf8 ok
                                    first mask)
world      xgrammar       2,587     1-35            8-22        all 120/120; utf8 ok
world      outlines-core  288       50-673          2.2-15      json flat 1/19, nested 0/12
                                                                (integer bounds ignored); no
                                                                grammar
demo       llguidance     126       ~0 (+0.5-0.9)   7-10        all 120/120; utf8 ok
demo       xgrammar       1         1-22            6           json flat 18/20: raw TAB
                                                                inside a JSON string
demo       outlines-core  2         0.5-28          1.6-1.7     json flat 6/20, nested 10/20
=========  =============  ========  ==============  ==========  ===========================

llguidance is the built-in (plugins/constraints.py): the only one right on every case, with masks
costing microseconds against a decode step's milliseconds, and Lark grammars a test can check with
the ``lark`` parser.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Callable

import jsonschema
import lark
import numpy as np

from rwkvkit.plugins.hf_tokenizer import HfTokenizer
from rwkvkit.plugins.rwkv_world import RwkvWorldTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from constraint_cases import GRAMMAR, GRAMMAR_GBNF, REGEXES, SCHEMAS  # noqa: E402

WALKS, MAX_STEPS = 20, 120
CJK = "\u4e2d"  # E4 B8 AD


def vocabularies() -> dict[str, tuple[list[bytes], int | None, Callable[[str], list[int]]]]:
    """name -> (each id's bytes, end-of-text id or None, encode)."""
    world = RwkvWorldTokenizer()
    demo = HfTokenizer(files("rwkvkit.demo") / "tokenizer.json")
    return {
        "world": ([world.decode_bytes([i]) for i in range(world.vocab_size)], 0, world.encode),
        "demo": ([demo.decode_bytes([i]) for i in range(demo.vocab_size)], None, demo.encode),
    }


class Llguidance:
    name = "llguidance"

    def __init__(self, tokens: list[bytes], eos: int, encode: Callable[[str], list[int]]) -> None:
        import llguidance

        class Wrapper(llguidance.TokenizerWrapper):
            def __init__(self) -> None:  # noqa: D401 - the fields LLTokenizer reads
                self.eos_token_id, self.bos_token_id, self.is_tokenizer_wrapper = eos, None, True
                self.tokens = [t or b"\xff[empty]" for t in tokens]  # 0xFF marks a special token
                self.special_token_ids = [i for i, t in enumerate(tokens) if not t]

            def __call__(self, text: str) -> list[int]:  # llguidance tokenizes forced text with it
                return encode(text)

        self.lib, self.tok = llguidance, llguidance.LLTokenizer(Wrapper())
        self.words = (self.tok.vocab_size + 31) // 32

    def compile(self, kind: str, source):
        m = self.lib.LLMatcher
        compile_kind = {"json": lambda s: m.grammar_from_json_schema(s, overrides={"whitespace_flexible": False}), "regex": m.grammar_from_regex, "grammar": m.grammar_from_lark}
        return compile_kind[kind](source)

    def start(self, compiled):
        matcher = self.lib.LLMatcher(self.tok, compiled)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def mask(self, matcher) -> np.ndarray:
        bits = np.empty(self.words, np.int32)
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return bits

    def advance(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokens: list[bytes], eos: int, encode: Callable[[str], list[int]]) -> None:
        import torch
        import xgrammar

        self.lib, self.torch = xgrammar, torch
        info = xgrammar.TokenizerInfo(tokens, xgrammar.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info)
        self.vocab = len(tokens)

    def compile(self, kind: str, source):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(source), any_whitespace=False)
        if kind == "grammar":
            return self.compiler.compile_grammar(GRAMMAR_GBNF)
        return self.compiler.compile_regex(source)

    def start(self, compiled):
        return self.lib.GrammarMatcher(compiled)

    def mask(self, matcher) -> np.ndarray:
        bits = self.lib.allocate_token_bitmask(1, self.vocab)
        matcher.fill_next_token_bitmask(bits, 0)
        return bits[0].numpy()

    def advance(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokens: list[bytes], eos: int, encode: Callable[[str], list[int]]) -> None:
        import outlines_core

        self.lib = outlines_core
        table: dict[bytes, list[int]] = {}
        for i, t in enumerate(tokens):
            if t and i != eos:
                table.setdefault(t, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, table)
        self.words = (len(tokens) + 31) // 32

    def compile(self, kind: str, source):
        from outlines_core.json_schema import build_regex_from_schema

        if kind == "grammar":
            return None  # no context-free grammars
        return self.lib.Index(build_regex_from_schema(json.dumps(source)) if kind == "json" else source, self.vocabulary)

    def start(self, compiled):
        return self.lib.Guide(compiled)

    def mask(self, guide) -> np.ndarray:
        bits = np.zeros(self.words, np.int32)
        guide.write_mask_into(bits.ctypes.data, bits.size, bits.itemsize)
        return bits

    def advance(self, guide, token: int) -> bool:
        guide.advance(token)
        return True

    def done(self, guide) -> bool:
        return guide.is_finished()


def allowed(bits: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab])


def walk(lib, compiled, tokens: list[bytes], eos: int, seed: int) -> tuple[bytes | None, list[float]]:
    """Bytes of one random walk (None: unfinished in MAX_STEPS) and its mask times."""
    t0 = time.perf_counter()
    rng, matcher, out, times = random.Random(seed), lib.start(compiled), [], []
    for _ in range(MAX_STEPS):
        t0 = t0 if not times else time.perf_counter()  # the first mask's time includes lib.start
        bits = lib.mask(matcher)
        times.append(time.perf_counter() - t0)
        ids = allowed(bits, len(tokens))
        if len(ids) == 0 or (len(ids) == 1 and ids[0] == eos) or lib.done(matcher):
            return b"".join(out), times
        token = int(rng.choice([i for i in ids.tolist() if i != eos] or [eos]))
        if token == eos:
            return b"".join(out), times
        assert lib.advance(matcher, token)
        out.append(tokens[token])
    return None, times


def valid(kind: str, source, data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
        if kind == "json":
            jsonschema.validate(json.loads(text), source)
            return True
        if kind == "grammar":
            lark.Lark(source).parse(text)
            return True
        return re.fullmatch(source, text) is not None
    except (UnicodeDecodeError, ValueError, jsonschema.ValidationError, lark.LarkError):
        return False


def utf8_pieces(lib, tokens: list[bytes]) -> bool:
    """A CJK character as three single-byte tokens is accepted; a stray continuation byte is not."""
    ids = {t: i for i, t in enumerate(tokens)}
    singles = [ids.get(bytes([b])) for b in CJK.encode()]
    if None in singles:
        return False
    compiled = lib.compile("regex", REGEXES["cjk"])
    matcher = lib.start(compiled)
    if singles[1] in allowed(lib.mask(matcher), len(tokens)):
        return False
    for token in singles:
        if token not in allowed(lib.mask(matcher), len(tokens)) or not lib.advance(matcher, token):
            return False
    return True


def main() -> None:
    cases = {f"json {k}": ("json", v) for k, v in SCHEMAS.items()} | {f"regex {k}": ("regex", v) for k, v in REGEXES.items()} | {"grammar": ("grammar", GRAMMAR)}
    print(f"{'tokenizer':9} {'library':13} {'case':14} {'setup_ms':>8} {'compile_ms':>10} {'first_ms':>8} {'mask_us':>8} {'valid':>7} utf8")
    for vocab_name, (tokens, eos, encode) in vocabularies().items():
        if eos is None:  # the demo tokenizer has no end-of-text token: add one past its vocabulary
            tokens, eos = tokens + [b""], len(tokens)
        for cls in (Llguidance, Xgrammar, OutlinesCore):
            t0 = time.perf_counter()
            lib = cls(tokens, eos, encode)
            setup = (time.perf_counter() - t0) * 1e3
            utf8 = utf8_pieces(lib, tokens)
            for case, (kind, source) in cases.items():
                t0 = time.perf_counter()
                compiled = lib.compile(kind, source)
                if compiled is None:
                    continue
                compile_ms = (time.perf_counter() - t0) * 1e3
                results = [walk(lib, compiled, tokens, eos, seed) for seed in range(WALKS)]
                finished = [data for data, _ in results if data is not None]
                times = [t for _, ts in results for t in ts[1:]]
                first = statistics.median(ts[0] for _, ts in results) * 1e3
                ok = sum(valid(kind, source, d) for d in finished)
                print(f"{vocab_name:9} {lib.name:13} {case:14} {setup:8.0f} {compile_ms:10.1f} {first:8.2f} {statistics.median(times) * 1e6:8.1f} {ok:>3}/{len(finished):<3} {utf8}")


if __name__ == "__main__":
    main()
