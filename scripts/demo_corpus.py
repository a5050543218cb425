"""Build the demo model's corpus and tokenizer from the King James Bible (public domain).

The text comes from Debian's ``bible-kjv-text`` package (read with the ``bible`` program of
``bible-kjv``, both fetched with ``apt-get download``, never installed). It is written one verse
per line, a blank line between chapters, without verse numbers. Three books (Ruth, Jonah, James:
narrative, prophecy, epistle) are held out for evaluation; they are shipped as
``rwkvkit/demo/heldout.txt`` so tests need neither Debian nor the corpus.

Usage: ``python scripts/demo_corpus.py [--out build/demo]`` writes ``train.txt`` there and
``rwkvkit/demo/{heldout.txt,tokenizer.json}``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "rwkvkit" / "demo"
HELD_OUT = ("Ruth", "Jonah", "Jas")  # book abbreviations as the `bible` program prints them
VOCAB_SIZE = 4096
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):\d+ (.*)$")


def read_kjv() -> str:
    """The whole KJV as ``Book1:1 text`` lines, one verse per line."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=tmp, check=True, capture_output=True)
        root = Path(tmp) / "root"
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        bible = [str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"]
        return subprocess.run(bible, check=True, capture_output=True, text=True).stdout


def split_books(kjv: str) -> tuple[str, str]:
    """``(train, held_out)`` text: verses one per line, chapters separated by a blank line."""
    parts: dict[bool, list[str]] = {False: [], True: []}
    chapter = None
    for line in kjv.splitlines():
        book, number, verse = _VERSE.match(line).groups()
        lines = parts[book in HELD_OUT]
        if (book, number) != chapter and lines:
            lines.append("")
        chapter = (book, number)
        lines.append(verse.strip())
    return ("\n".join(parts[False]) + "\n", "\n".join(parts[True]) + "\n")


def train_tokenizer(files: list[Path], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (GPT-2 style), so any input text encodes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(f) for f in files], trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "demo", help="where train.txt goes")
    args = parser.parse_args()
    train, held_out = split_books(read_kjv())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.txt").write_text(train, encoding="utf-8")
    (DEMO / "heldout.txt").write_text(held_out, encoding="utf-8")
    tokenizer = train_tokenizer([args.out / "train.txt"])
    tokenizer.save(str(DEMO / "tokenizer.json"))
    print(f"train {len(train)} chars, held-out {len(held_out)} chars, vocabulary {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()
