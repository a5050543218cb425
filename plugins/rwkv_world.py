"""Built-in ``rwkv_world`` tokenizer (also registered as ``rwkv_vocab_v20230424``, ChatRWKV's name):
the RWKV World vocabulary, encoded by greedy longest match over UTF-8 bytes, token for token
identical to the reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``.

The reference walks a pure-Python trie (3-4 MB/s). The ``tokenizers`` library cannot replace it:
its only greedy longest-match model, WordPiece, is exact on this vocabulary only if the text is
not split into words first, and on unsplit text it rescans from the end of the text for every
token (quadratic: 0.0002 MB/s on 32 kB), while any word split changes the ids. So encoding runs in
a C++ double-array trie (``kernels/rwkv_world_tokenizer.cpp``, about 25x the reference's speed)
compiled on first use into the user cache, with a pure-Python fallback, as fast as the
reference, where no compiler is available.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import os
import warnings
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rwkvkit.errors import TokenizerError
from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import Tokenizer, check_ids, utf8_bytes
from rwkvkit.native import load_library

VOCAB_FILE = Path(__file__).with_name("rwkv_vocab_v20230424.txt")
WORLD_VOCAB_SIZE = 65536  # rows of the World models' embedding and head; the file's ids end at 65529
KERNEL = "rwkv_world_tokenizer.cpp"
MAX_VOCAB = 1 << 21  # ids index a table: 2M is 8x the largest vocabularies in use, and a typo'd id fails by name


class RwkvWorldTokenizer(Tokenizer):
    """Options: ``vocab_file`` (default: the shipped World vocabulary, see VOCAB_NOTICE.md) and
    ``native`` (False uses the pure-Python encoder even where the C++ one can be built).

    ``vocab_size`` is 65536 for the shipped vocabulary, as in the World models, so any id such a
    model samples decodes; for another file it is the highest id in it plus one. Ids without a
    token decode to ``b""`` (the reference raises KeyError): in the World vocabulary, 0 (end of
    text) and 65530..65535 (never trained).

    A token may hold part of a UTF-8 character, so ``decode`` of ids that end mid-character raises
    TokenizerError (``errors="replace"`` substitutes U+FFFD instead); streaming callers join
    ``decode_bytes`` pieces and decode only whole characters.
    """

    name = "rwkv_world"

    def __init__(self, vocab_file: str | os.PathLike[str] | None = None, native: bool = True) -> None:
        self._path = Path(vocab_file or VOCAB_FILE).resolve()
        self._tokens = _load_vocab(self._path)
        self._vocab_size = WORLD_VOCAB_SIZE if vocab_file is None else len(self._tokens)
        # the World models' end-of-text id (structured output lets a model end with it)
        self.eos_token_id: int | None = 0 if vocab_file is None else None
        self._native = native

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return _encoder(self._path, self._native)(utf8_bytes(text))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        tokens, defined = self._tokens, len(self._tokens)
        return b"".join([tokens[i] if i < defined else b"" for i in check_ids(ids, self._vocab_size)])


@functools.cache
def _load_vocab(path: Path) -> list[bytes]:
    """Token bytes indexed by id (``b""`` where the file defines none), read once per process."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise TokenizerError(f"cannot read vocab file {path}: {exc}") from None
    tokens: dict[int, bytes] = {}
    ids: dict[bytes, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        try:
            token_id, token = _parse_line(line)
        except (ValueError, SyntaxError) as exc:
            raise TokenizerError(f"{path}:{number}: malformed vocab line {line!r:.80}: {exc}") from None
        if token_id in tokens:
            raise TokenizerError(f"{path}:{number}: token id {token_id} is defined twice")
        if token in ids:
            raise TokenizerError(f"{path}:{number}: token {token!r} is already id {ids[token]}")
        tokens[token_id] = token
        ids[token] = token_id
    missing = [byte for byte in range(256) if bytes([byte]) not in ids]
    if missing:
        raise TokenizerError(
            f"vocab file {path} has no token for the byte 0x{missing[0]:02x}: byte-level encoding needs all 256"
        )
    table = [b""] * (max(tokens) + 1)
    for token_id, token in tokens.items():
        table[token_id] = token
    return table


def _parse_line(line: str) -> tuple[int, bytes]:
    """``<id> <str or bytes literal> <length in bytes>``, read with ast.literal_eval (the
    reference uses eval)."""
    head, _, rest = line.partition(" ")
    literal, _, length = rest.rpartition(" ")
    token = ast.literal_eval(literal)
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, bytes) or not token:
        raise ValueError("expected a non-empty str or bytes literal")
    if len(token) != int(length):
        raise ValueError(f"the token has {len(token)} bytes, the line says {length}")
    token_id = int(head)
    if not 0 <= token_id < MAX_VOCAB:
        raise ValueError(f"id {token_id} is not in 0..{MAX_VOCAB - 1}")
    return token_id, token


@functools.cache
def _encoder(path: Path, native: bool) -> Callable[[bytes], list[int]]:
    """The encoder of a vocab file, built on its first ``encode`` and shared by its tokenizers."""
    tokens = _load_vocab(path)
    lib = _native_library() if native else None
    return _NativeEncoder(lib, tokens) if lib else _PythonEncoder(tokens)


class _NativeEncoder:
    """The C++ trie, freed along with this object."""

    def __init__(self, lib: ctypes.CDLL, tokens: list[bytes]) -> None:
        lengths = np.fromiter(map(len, tokens), np.int32, len(tokens))
        self._lib = lib
        self._trie = lib.rwkv_trie_new(b"".join(tokens), lengths.ctypes.data, len(tokens))
        if not self._trie:
            raise MemoryError("out of memory building the rwkv_world tokenizer's trie")
        weakref.finalize(self, lib.rwkv_trie_free, self._trie)

    def __call__(self, data: bytes) -> list[int]:
        out = np.empty(len(data), np.int32)  # every token is at least one byte
        count = self._lib.rwkv_trie_encode(self._trie, data, len(data), out.ctypes.data)
        return out[:count].tolist()


class _PythonEncoder:
    """Maps every prefix of every token to that prefix's id, or -1 where the prefix is not a token
    itself; extending a match while the slice is a key walks exactly the reference's trie."""

    def __init__(self, tokens: list[bytes]) -> None:
        self._prefixes: dict[bytes, int] = {}
        for token_id, token in enumerate(tokens):
            for end in range(1, len(token)):
                self._prefixes.setdefault(token[:end], -1)
            if token:
                self._prefixes[token] = token_id

    def __call__(self, data: bytes) -> list[int]:
        get = self._prefixes.get
        ids: list[int] = []
        start = 0
        while start < len(data):
            best, end, stop = -1, start + 1, start + 1  # every single byte is a token: best gets set
            while stop <= len(data) and (token_id := get(data[start:stop])) is not None:
                if token_id >= 0:
                    best, end = token_id, stop
                stop += 1
            ids.append(best)
            start = end
        return ids


@functools.cache
def _native_library() -> ctypes.CDLL | None:
    """The C++ encoder (see :mod:`rwkvkit.native`); None, after a warning saying why, if it
    cannot be built or loaded."""
    try:
        lib = load_library(KERNEL)
    except OSError as exc:
        warnings.warn(
            f"rwkv_world tokenizer: cannot build its C++ encoder ({exc}); using the pure-Python encoder,"
            " about 25x slower",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    lib.rwkv_trie_new.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64]
    lib.rwkv_trie_new.restype = ctypes.c_void_p
    lib.rwkv_trie_free.argtypes = [ctypes.c_void_p]
    lib.rwkv_trie_free.restype = None
    lib.rwkv_trie_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p]
    lib.rwkv_trie_encode.restype = ctypes.c_int64
    return lib


@hookimpl
def register_tokenizers(register) -> None:
    register(RwkvWorldTokenizer, name="rwkv_world")
    register(RwkvWorldTokenizer, name="rwkv_vocab_v20230424")
