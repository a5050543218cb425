"""Perplexity on a text: the yardstick for what a backend, a strategy or a quantization costs in
quality. Run the same text and tokenizer through two models of the same weights; the quality
loss is the ratio of their perplexities (random weights cannot show it, a trained model can)."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkvkit.compat import RWKV
from rwkvkit.errors import InputError
from rwkvkit.interfaces import Tokenizer
from rwkvkit.model import Model
from rwkvkit.resolve import resolve_tokenizer


def perplexity(model: Model, tokenizer: Tokenizer | str | Path, text: str, chunk_len: int = 256) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``text``.

    The text is fed in chunks of ``chunk_len`` tokens with the state carried between them, so the
    result is that of one pass over the whole text (the first token, having no context, is not
    scored) and any strategy or backend can be compared on the same footing.
    """
    ids = resolve_tokenizer(tokenizer).encode(text)
    if len(ids) < 2:
        raise InputError(f"perplexity needs a text of at least 2 tokens, got {len(ids)}")
    if chunk_len < 1:
        raise InputError(f"chunk_len must be >= 1, got {chunk_len}")
    nll, state = 0.0, None
    for start in range(0, len(ids) - 1, chunk_len):
        end = min(start + chunk_len, len(ids) - 1)
        logits, state = model.forward(ids[start:end], state, full_output=True)
        nll += float(F.cross_entropy(logits.float(), torch.tensor(ids[start + 1 : end + 1]), reduction="sum"))
    return math.exp(nll / (len(ids) - 1))


def demo_perplexity(strategy: str = "cpu fp32", backend: str = "auto", chunk_len: int = 256) -> float:
    """Held-out perplexity of the shipped demo model (``rwkvkit/demo``, see its CORPUS.md) under a
    strategy and backend. The quality loss of, say, int8 weights is
    ``demo_perplexity("cpu fp32i8") / demo_perplexity("cpu fp32")``."""
    demo = resources.files("rwkvkit.demo")
    model = RWKV(Path(str(demo / "demo.pth")), strategy, backend=backend)
    return perplexity(model, Path(str(demo / "tokenizer.json")), (demo / "heldout.txt").read_text(encoding="utf-8"), chunk_len)
