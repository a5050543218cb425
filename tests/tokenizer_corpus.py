"""Real text found on this machine, for the tokenizer parity test and benchmark: Python sources and
documentation of the installed packages and /usr/share/doc, translation catalogs (Chinese,
Japanese, Korean, Cyrillic, Greek, Arabic...) from /usr/share/locale, and emoji sequences, which
few files hold. Sources are interleaved chunk by chunk, so any prefix mixes them."""

from __future__ import annotations

import gettext
import random
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

CHUNK = 20_000  # characters taken from one file at a time
LANGUAGES = ("zh_CN", "ja", "ko", "ru", "el", "ar", "hi", "zh_TW", "he", "th", "vi", "de")


def machine_text(min_bytes: int) -> str:
    """At least ``min_bytes`` of UTF-8, the same on every call on a given machine."""
    packages = Path(sysconfig.get_paths()["purelib"])
    sources = [
        _file_texts(sorted(packages.rglob("*.py"))),
        _file_texts(sorted([*packages.rglob("*.md"), *packages.rglob("*.rst"), *Path("/usr/share/doc").rglob("*")])),
        _round_robin([_catalog_texts(language) for language in LANGUAGES]),
        _emoji_texts(),
    ]
    parts, size = [], 0
    for chunk in _round_robin(sources):
        parts.append(chunk)
        size += len(chunk.encode())
        if size >= min_bytes:
            break
    return "".join(parts)


def _round_robin(iterables: Iterable[Iterable[str]]) -> Iterator[str]:
    iterators = [iter(iterable) for iterable in iterables]
    while iterators:
        for iterator in list(iterators):
            try:
                yield next(iterator)
            except StopIteration:
                iterators.remove(iterator)


def _file_texts(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError):  # directories, binary and unreadable files
            continue
        if text:
            yield text[:CHUNK]


def _catalog_texts(language: str) -> Iterator[str]:
    for path in sorted(Path("/usr/share/locale", language, "LC_MESSAGES").glob("*.mo")):
        try:
            with path.open("rb") as f:
                catalog = gettext.GNUTranslations(f)
        except (OSError, UnicodeError, ValueError):
            continue
        # GNUTranslations has no public way to list its messages
        yield "\n".join(text for text in catalog._catalog.values() if isinstance(text, str))[:CHUNK]


def _emoji_texts() -> Iterator[str]:
    """Chat-like lines: words with emoji, skin tones, ZWJ families, flags and keycaps."""
    rng = random.Random(0)
    emoji = [chr(c) for c in [*range(0x1F300, 0x1F650), *range(0x1F680, 0x1F6D0), *range(0x1F90C, 0x1FA00)]]
    emoji += ["👩\u200d💻", "👨\u200d👩\u200d👧\u200d👦", "👍🏽", "🏳️\u200d🌈", "🇯🇵", "🇺🇸", "1️⃣", "❤️", "✨"]
    words = "ok so this is great lol thanks see you soon love it party time".split()
    while True:
        yield " ".join(rng.choice(emoji) * rng.randint(1, 3) if rng.random() < 0.4 else rng.choice(words) for _ in range(400)) + "\n"
