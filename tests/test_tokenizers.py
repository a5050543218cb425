"""Tokenizer plugins: ``rwkv_world`` token for token against the reference trie tokenizer (both its
C++ and its pure-Python encoder), round trips, bad input and bad vocab files, and ``hf``."""

from __future__ import annotations

import operator
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from tokenizer_corpus import machine_text
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rwkvkit.errors import InputError, TokenizerError
from rwkvkit import native
from rwkvkit.plugins import rwkv_world
from rwkvkit.plugins.hf_tokenizer import HfTokenizer, _byte_level_alphabet
from rwkvkit.plugins.rwkv_world import VOCAB_FILE, RwkvWorldTokenizer
from rwkvkit.registry import Registry

TARGETED = [
    "\r\n", "\n", "\r", "\t", " ", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\ufeff", "\u200b", "\u200d",
    "e\u0301", "\u0301", "a\u0308\u0323", "\u0915\u094d\u0937", "中", "文字", "日本語", "한국어", "Привет",
    "🙂", "👍🏽", "👩\u200d💻", "🇯🇵", "1️⃣", "\U0001f9ff", "\U00010348", "\U000e0001", "\U0010ffff",
    "the", " the", "def ", "    ", "\\", "'", '"', "##", "==", "--", "0", "1234",
]
RUN_CHARS = [" ", "\n", "\r\n", "\t", "-", "=", "#", "0", "a", "中", "🙂", "\x00"]
# Any code point but surrogates (st.text() covers all planes), targeted pieces, and long runs.
PIECES = st.one_of(
    st.text(),
    st.lists(st.sampled_from(TARGETED) | st.characters(max_codepoint=0x7F), max_size=30).map("".join),
    st.sampled_from(TARGETED),
    st.builds(operator.mul, st.sampled_from(RUN_CHARS) | st.characters(codec="utf-8"), st.integers(1, 400)),
)
TEXTS = st.lists(PIECES, max_size=12).map("".join)


@pytest.fixture(scope="session")
def reference() -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(str(VOCAB_FILE))


@pytest.fixture(scope="session", params=[True, False], ids=["native", "python"])
def world(request) -> RwkvWorldTokenizer:
    return RwkvWorldTokenizer(native=request.param)


@pytest.fixture(scope="session")
def corpus(reference) -> tuple[str, list[int]]:
    text = machine_text(1_100_000)
    return text, reference.encode(text)


def assert_same_ids(ours: list[int], expected: list[int], reference: TRIE_TOKENIZER) -> None:
    """``ours == expected``, but on failure shows the first difference instead of two huge lists."""
    if ours != expected:
        i = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
        raise AssertionError(
            f"ids differ at token {i} of {len(expected)}: ours {ours[i:i + 5]}, reference {expected[i:i + 5]}"
            f" = {reference.decodeBytes(expected[i:i + 5])!r}"
        )


def write_vocab(path: Path, extra: list[str]) -> Path:
    """A vocab file with the 256 single bytes (ids 1..256) followed by the ``extra`` lines."""
    lines = [f"{byte + 1} {bytes([byte])!r} 1" for byte in range(256)] + extra
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- rwkv_world: parity with the reference -------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_world_encode_matches_reference_on_any_text(world, reference, text):
    assert world.encode(text) == reference.encode(text)


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_world_round_trip(world, text):
    assert world.decode(world.encode(text)) == text


def test_world_encode_matches_reference_on_machine_corpus(world, reference, corpus):
    text, expected = corpus
    assert len(text.encode()) >= 1_000_000
    assert_same_ids(world.encode(text), expected, reference)


def test_world_vocab_matches_reference(reference):
    world = RwkvWorldTokenizer()
    assert world.vocab_size == 65536
    assert sorted(reference.idx2token) == list(range(1, 65530))
    assert [world.decode_bytes([i]) for i in range(1, 65530)] == [reference.idx2token[i] for i in range(1, 65530)]


@pytest.fixture(scope="session")
def small_vocab(tmp_path_factory) -> tuple[Path, TRIE_TOKENIZER]:
    """Tokens "ab" and "abcd" but not "abc": on "abcx" the walk reaches "abc", fails, and must fall
    back to "ab", the case a wrong longest-match implementation gets wrong. Longer tokens come
    first here, unlike in the World vocabulary, so the order of the file cannot matter."""
    path = write_vocab(
        tmp_path_factory.mktemp("vocab") / "vocab.txt",
        ["257 'abcd' 4", "258 'ab' 2", "259 'bcd' 3", "260 'ddd' 3", "261 'dd' 2"],
    )
    return path, TRIE_TOKENIZER(str(path))


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@settings(max_examples=200, deadline=None)
@given(text=st.text("abcdx", max_size=40))
def test_world_matches_reference_where_the_trie_walks_past_the_last_token(small_vocab, native, text):
    path, reference = small_vocab
    assert RwkvWorldTokenizer(vocab_file=path, native=native).encode(text) == reference.encode(text)


# --- rwkv_world: decoding ----------------------------------------------------------------------------


def test_world_decode_strict_raises_and_replace_substitutes_on_partial_character(world):
    ids = world.encode("\U0010ffff")  # no token holds it whole
    assert len(ids) > 1
    with pytest.raises(TokenizerError, match="invalid UTF-8 at byte 0 of 1 .* errors='replace'"):
        world.decode(ids[:1])
    assert world.decode(ids[:1], errors="replace") == "\ufffd"
    # streaming callers join decode_bytes pieces and decode whole characters
    assert b"".join(world.decode_bytes([i]) for i in ids) == "\U0010ffff".encode()


@pytest.mark.parametrize("token", [0, 65530, 65535])
def test_world_ids_without_a_token_decode_to_nothing(world, reference, token):
    """0 is end of text, 65530.. are never trained; a model may still sample them."""
    assert world.decode_bytes([token]) == b""
    assert world.decode([65, token, 66]) == "@A"  # id = byte + 1 for single bytes
    with pytest.raises(KeyError):  # the reference's decodeBytes; we document b"" instead
        reference.decodeBytes([token])


@pytest.mark.parametrize("ids", [[-1], [65536], [10**12], [1, 2, -5]])
def test_world_decode_rejects_ids_out_of_range(world, ids):
    with pytest.raises(InputError, match=r"out of range: this tokenizer's ids are 0\.\.65535"):
        world.decode_bytes(ids)


def test_custom_vocab_size_is_its_highest_id_plus_one(small_vocab):
    path, _ = small_vocab
    tokenizer = RwkvWorldTokenizer(vocab_file=path)
    assert tokenizer.vocab_size == 262
    assert tokenizer.decode_bytes([258, 0]) == b"ab"
    with pytest.raises(InputError, match=r"0\.\.261"):
        tokenizer.decode_bytes([262])


@pytest.mark.parametrize("ids", [[1.5], ["a"], [None], 7, "abc"])
def test_world_decode_rejects_non_integer_ids(world, ids):
    with pytest.raises(InputError, match="sequence of integers"):
        world.decode(ids)


def test_world_decode_accepts_numpy_ids(world):
    assert world.decode(np.array(world.encode("Hello world"))) == "Hello world"


# --- rwkv_world: bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("text", [b"hello", None, 42, ["a"]])
def test_world_encode_rejects_non_str(world, text):
    with pytest.raises(InputError, match="must be a str"):
        world.encode(text)


def test_world_encode_rejects_lone_surrogates(world):
    with pytest.raises(InputError, match=r"lone surrogate '\\ud800' at index 1"):
        world.encode("a\ud800b")


def test_world_encode_empty(world):
    assert world.encode("") == []
    assert world.decode([]) == ""


def test_missing_vocab_file_names_it(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(TokenizerError, match=re.escape(f"cannot read vocab file {path}")):
        RwkvWorldTokenizer(vocab_file=path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("x 'ab' 2", "invalid literal for int"),
        ("-3 'ab' 2", "id -3 is not in"),
        ("300 'ab' 3", "the token has 2 bytes, the line says 3"),
        ("300 'ab 2", "malformed vocab line"),
        ("300 12 2", "expected a non-empty str or bytes literal"),
        ("300 '' 0", "expected a non-empty str or bytes literal"),
        ("300 __import__('os') 2", "malformed vocab line"),  # literal_eval, never eval
        ("300 'ab'", "malformed vocab line"),
        ("100 'ab' 2", "token id 100 is defined twice"),
        ("300 b'\\x05' 1", r"token b'\\x05' is already id 6"),
    ],
)
def test_malformed_vocab_line_names_file_and_line(tmp_path, line, message):
    path = write_vocab(tmp_path / "vocab.txt", ["257 'ok' 2", line])
    with pytest.raises(TokenizerError, match=message) as info:
        RwkvWorldTokenizer(vocab_file=path)
    assert f"{path}:258:" in str(info.value)


def test_vocab_without_every_byte_is_rejected(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("1 'a' 1\n2 'ab' 2\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=re.escape(f"vocab file {path} has no token for the byte 0x00")):
        RwkvWorldTokenizer(vocab_file=path)


def test_vocab_that_is_not_utf8_is_rejected(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"1 '\xff' 1\n")
    with pytest.raises(TokenizerError, match=re.escape(f"cannot read vocab file {path}")):
        RwkvWorldTokenizer(vocab_file=path)


# --- rwkv_world: loading, caching, the native encoder ----------------------------------------------


def test_vocab_is_parsed_once_per_process():
    assert RwkvWorldTokenizer()._tokens is RwkvWorldTokenizer(vocab_file=str(VOCAB_FILE))._tokens


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_native_encoder_builds_where_a_compiler_exists():
    assert rwkv_world._native_library() is not None


@pytest.fixture
def fresh_native_library():
    caches = (rwkv_world._native_library, native.load_library)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


@pytest.mark.parametrize(
    "cxx, path, message",
    [
        ("/nonexistent/c++", None, "No such file"),
        ("", "", "no C\\+\\+ compiler found"),
        pytest.param("c++ -bogus-flag", None, "failed", marks=pytest.mark.skipif(shutil.which("c++") is None, reason="no c++")),
    ],
)
def test_without_a_working_compiler_encoding_falls_back_to_python(
    tmp_path, monkeypatch, fresh_native_library, cxx, path, message
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing compiled there yet
    monkeypatch.delenv("RWKVKIT_CACHE", raising=False)
    monkeypatch.setenv("CXX", cxx)
    if path is not None:
        monkeypatch.setenv("PATH", path)
    vocab = write_vocab(tmp_path / "vocab.txt", ["257 'ab' 2"])
    with pytest.warns(RuntimeWarning, match=f"(?s)cannot build its C\\+\\+ encoder.*{message}.*pure-Python"):
        assert RwkvWorldTokenizer(vocab_file=vocab).encode("abc") == [257, 100]


# --- registry ----------------------------------------------------------------------------------------


def test_plugins_are_registered():
    registry = Registry()
    assert registry.get("tokenizers", "rwkv_world") is RwkvWorldTokenizer
    assert registry.get("tokenizers", "rwkv_vocab_v20230424") is RwkvWorldTokenizer
    assert registry.get("tokenizers", "hf") is HfTokenizer


# --- hf -------------------------------------------------------------------------------------------------

HF_TRAINING_TEXT = ["hello world, the quick brown fox", "你好世界 日本語 🙂 emoji", "def f(x):\n    return x\r\n"] * 30


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory) -> Path:
    """A tiny GPT-2 style byte-level BPE with an end-of-text special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(HF_TRAINING_TEXT, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf(hf_file) -> HfTokenizer:
    return HfTokenizer(path=hf_file)


@pytest.fixture(scope="module")
def hf_library(hf_file) -> Tokenizer:
    return Tokenizer.from_file(str(hf_file))


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_hf_round_trip_and_library_parity(hf, hf_library, text):
    library = hf_library
    ids = hf.encode(text)
    assert ids == library.encode(text).ids
    assert hf.decode(ids) == text == library.decode(ids)


def test_hf_vocab_size_and_special_token(hf, hf_library):
    library = hf_library
    assert hf.vocab_size == library.get_vocab_size() > 256
    assert hf.encode("<|endoftext|>") == [0]
    assert hf.decode_bytes([0]) == b""  # special tokens are skipped, as by the library
    assert hf.decode(hf.encode("hi <|endoftext|>you")) == library.decode(library.encode("hi <|endoftext|>you").ids)


def test_hf_decode_bytes_keeps_a_split_character_for_streaming(hf):
    ids = hf.encode("\U0001d11e")  # not in the training text: one token per byte
    assert len(ids) == 4
    assert [hf.decode_bytes([i]) for i in ids] == [bytes([b]) for b in "\U0001d11e".encode()]
    with pytest.raises(TokenizerError, match="invalid UTF-8 at byte 0 of 2"):
        hf.decode(ids[:2])
    assert hf.decode(ids[:2], errors="replace") == "\ufffd"


def test_hf_byte_alphabet_is_the_librarys():
    alphabet = _byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())


def test_hf_other_decoders_use_the_librarys_decode(tmp_path):
    library = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    library.pre_tokenizer = pre_tokenizers.Whitespace()
    library.save(str(tmp_path / "tokenizer.json"))
    hf = HfTokenizer(path=tmp_path / "tokenizer.json")
    assert hf.encode("hello  world") == [1, 2]
    assert hf.decode([1, 2]) == "hello world" == library.decode([1, 2])
    assert hf.vocab_size == 3


@pytest.mark.parametrize("content", [None, "{not json", '{"model": 1}'])
def test_hf_missing_or_malformed_file_names_it(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenizerError, match=re.escape(f"cannot load tokenizer file {path}: ")):
        HfTokenizer(path=path)


def test_hf_bad_input(hf):
    with pytest.raises(InputError, match="must be a str"):
        hf.encode(b"bytes")
    with pytest.raises(InputError, match="lone surrogate"):
        hf.encode("\udfff")
    with pytest.raises(InputError, match="out of range"):
        hf.decode([hf.vocab_size])
    with pytest.raises(InputError, match="out of range"):
        hf.decode_bytes([-1])
