"""Built-in ``hf`` tokenizer: any Hugging Face ``tokenizer.json`` (such as the 20B_tokenizer.json of
RWKV-4 Pile models) through the ``tokenizers`` library, selected with the ``path`` option."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import decoders

from rwkvkit.errors import TokenizerError
from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import Tokenizer, check_ids, utf8_bytes


class HfTokenizer(Tokenizer):
    """For byte-level tokenizers (a ``ByteLevel`` decoder, as in GPT-2 style BPE) ``decode_bytes``
    returns each token's exact bytes, so a streaming caller can hold back a character split across
    tokens; the library's own decode would already have replaced it with U+FFFD. For any other
    decoder it is the library's decoded text as UTF-8. Special tokens decode to nothing, as in the
    library's default (and ChatRWKV)."""

    name = "hf"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
        except Exception as exc:  # the library raises a bare Exception for missing and malformed files
            raise TokenizerError(f"cannot load tokenizer file {Path(path)}: {exc}") from None
        self._vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        byte_level = isinstance(self._tokenizer.decoder, decoders.ByteLevel)
        self._token_bytes = _byte_level_table(self._tokenizer, self._vocab_size) if byte_level else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        utf8_bytes(text)  # the library's error for a non-str or a lone surrogate does not say which
        return self._tokenizer.encode(text).ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        ids = check_ids(ids, self._vocab_size)
        if self._token_bytes is None:
            return self._tokenizer.decode(ids).encode("utf-8")
        return b"".join([self._token_bytes[i] for i in ids])


def _byte_level_table(tokenizer: tokenizers.Tokenizer, vocab_size: int) -> list[bytes]:
    """Each id's bytes as the ByteLevel decoder makes them: a token spelled in GPT-2's byte alphabet
    maps back char by char, any other (an added token) is its own UTF-8; special tokens are b""."""
    char_bytes = _byte_level_alphabet()
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    table = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None or i in special:
            table.append(b"")
        elif all(char in char_bytes for char in token):
            table.append(bytes(char_bytes[char] for char in token))
        else:
            table.append(token.encode("utf-8"))
    return table


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's char -> byte table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    for U+0100 onwards, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(0x100 + k): byte for k, byte in enumerate(others)}


@hookimpl
def register_tokenizers(register) -> None:
    register(HfTokenizer, name="hf")
