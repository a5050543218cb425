"""The API ChatRWKV users already write: ``RWKV(model=..., strategy=...)`` and
``model.forward(tokens, state) -> (logits, state)``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rwkvkit.checkpoint import load_checkpoint
from rwkvkit.model import Model
from rwkvkit.state import State
from rwkvkit.strategy import parse_strategy


class RWKV(Model):
    """Load a checkpoint (``.pth`` suffix optional) for a ChatRWKV strategy string.

    ``backend`` picks the implementation for every stage (``auto``: the fastest available).
    """

    def __init__(self, model: str | Path, strategy: str = "cpu fp32", *, backend: str = "auto") -> None:
        checkpoint = load_checkpoint(model)
        super().__init__(checkpoint, parse_strategy(strategy, checkpoint.spec.n_layer, backend))
        spec = self.spec
        # ChatRWKV exposes these; scripts read e.g. model.args.n_layer
        self.args = SimpleNamespace(
            MODEL_NAME=str(model),
            n_layer=spec.n_layer,
            n_embd=spec.n_embd,
            n_head=spec.n_head,
            head_size=spec.head_size,
            vocab_size=spec.vocab_size,
        )
        self.version = spec.version

    def generate_zero_state(self) -> State:
        return self.zero_state()
