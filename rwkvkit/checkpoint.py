"""Reading RWKV checkpoints: find the file, load tensors lazily, detect the architecture from the
keys, derive the model's dimensions from shapes, and validate every key before any math runs.

Every failure is a :class:`CheckpointError` naming the file and the key, because a KeyError deep in
a forward pass tells a user nothing about which file is wrong.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from rwkvkit import pages
from rwkvkit.errors import CheckpointError
from rwkvkit.paths import candidates, model_file

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of an RWKV-7 model, all derived from tensor shapes. Other generations have their
    own spec dataclasses (in their model modules); every spec has ``n_layer``, ``n_embd``,
    ``vocab_size``, ``version`` and ``architecture`` (the registry name of its architecture)."""

    architecture: ClassVar[str] = "rwkv7"

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    dim_ffn: int
    lora_w: int  # decay LoRA rank
    lora_a: int  # in-context learning-rate LoRA rank
    lora_v: int  # value-residual LoRA rank
    lora_g: int  # gate LoRA rank
    version: int = 7


@dataclass
class Checkpoint:
    """A validated checkpoint: its spec and tensors (still memory-mapped where the format allows)."""

    path: Path
    spec: Any  # the architecture's spec dataclass (ModelSpec for RWKV-7)
    tensors: dict[str, torch.Tensor]
    merged: tuple[str, ...] = ()  # what was merged into the weights at load (LoRA digests)
    # RWKV-Runner's "merged state" models: the blocks.N.att.time_state tensors the file carries
    # beside the weights, the model's default initial state (rwkvkit.formats.tuned_state)
    tuned_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def architecture(self) -> Any:
        """The registered :class:`rwkvkit.architecture.Architecture` of this checkpoint."""
        from rwkvkit.registry import registry

        return registry.get("architectures", self.spec.architecture)()

    def fingerprint(self) -> str:
        """A content fingerprint that is cheap for any model size: sha256 over the spec, what was
        merged in, and the bytes of every small (≤ 1-D-sized) tensor the model reads (and of a
        tuned initial state the file carries: it changes what the model computes). Two
        checkpoints with the same shapes but different weights differ in their per-channel vectors,
        so states cannot be mixed up; the same model in another file format has the same one."""
        h = hashlib.sha256(repr(astuple(self.spec)).encode())
        for item in self.merged:
            h.update(item.encode())
        small = self.spec.n_embd * getattr(self.spec, "head_size", 64)  # RWKV-4 has no heads
        small_tensors = {k: t for k, t in self.tensors.items() if k not in self.architecture.unread and t.numel() <= small}
        for key, t in sorted((small_tensors | self.tuned_state).items()):
            h.update(key.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]


@dataclass(frozen=True)
class WeightSource:
    """One weight to prepare, read on demand from the checkpoint: a backend with a cache of its
    prepared form need not read it at all, and one that transforms rows independently (int8
    quantization) can read a block of rows at a time and :meth:`release` each, so no full-size
    temporary and no resident copy of the file outlive the block. ``rows_fn`` derives rows from
    the stored ones (the embedding with ``ln0`` folded in); it must treat every row alone, and
    ``derivation`` must name everything it depends on besides the checkpoint (constants), because a
    cache of prepared weights keys the result by :attr:`cache_key`."""

    key: str
    stored: torch.Tensor  # as the checkpoint holds it (memory-mapped where the format allows)
    rows_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    derivation: str = ""

    @property
    def cache_key(self) -> str:
        """The checkpoint key, plus how the rows were derived from it (if they were)."""
        return f"{self.key}|{self.derivation}" if self.derivation else self.key

    @property
    def shape(self) -> torch.Size:
        return self.stored.shape

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (all by default), derived by ``rows_fn`` when there is one."""
        part = self.stored[start:stop]
        return part if self.rows_fn is None else self.rows_fn(part)

    def release(self, start: int, stop: int) -> None:
        """Drop the mapped pages of stored rows ``start:stop`` from this process's resident memory
        (:func:`rwkvkit.pages.release`; nothing happens when they are not file-mapped)."""
        pages.release(self.stored[start:stop])


def resolve_path(name: str | Path) -> Path:
    """Find the checkpoint file the way ChatRWKV users expect: the path as given, else with
    ``.pth`` or ``.safetensors`` appended; ``pkg://package/file``, model config names (``demo``)
    and Hugging Face model folders (rwkvkit.formats.hf) are accepted too."""
    tries = candidates(model_file(name))
    for candidate in tries:
        if candidate.is_file() or (candidate / "config.json").is_file():
            return candidate
        if candidate.is_dir():
            raise CheckpointError(
                f"{candidate} is a directory without config.json; expected an RWKV checkpoint file (.pth or .safetensors) "
                "or a Hugging Face model folder (config.json + model*.safetensors)"
            )
    tried = ", ".join(str(c) for c in tries)
    raise CheckpointError(f"checkpoint not found: {name} (tried {tried})")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint under BlinkDL's key names, whatever the format on disk."""
    if path.is_dir():
        from rwkvkit.formats.hf import read_folder

        return read_folder(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            # the legacy (pre-1.6, non-zip) format cannot be memory-mapped: it is read into RAM
            tensors = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as exc:  # torch/safetensors raise many unrelated types for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch/safetensors checkpoint (truncated, corrupt, or a pickle "
            f"that is not a plain tensor dict): {reason}"
        ) from exc
    if not isinstance(tensors, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, got {type(tensors).__name__}")
    return dict(tensors)


def detect_architecture(keys: set[str]) -> Any:
    """The registered architecture that claims a checkpoint with these keys (each generation
    renamed its time-mix parameters, so key names alone tell them apart)."""
    from rwkvkit.registry import registry

    if "emb.weight" not in keys or not any(_BLOCK_KEY.match(k) for k in keys):
        raise CheckpointError("no 'emb.weight' / 'blocks.N.*' keys: this is not an RWKV checkpoint")
    archs = [registry.get("architectures", name)() for name in registry.names("architectures")]
    claimed = [arch for arch in archs if arch.claims(keys)]
    if len(claimed) > 1:
        raise CheckpointError(f"several architectures claim this checkpoint: {', '.join(a.name for a in claimed)}; uninstall or block one (RWKVKIT_BLOCK_PLUGINS)")
    if not claimed:
        known = ", ".join(f"{a.name} ({a.describe()})" for a in archs)
        raise CheckpointError(f"RWKV-like keys but no installed architecture claims them (installed: {known})")
    return claimed[0]


def expected_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    """Every key of a checkpoint of ``spec`` with its shape, as real model files store them."""
    from rwkvkit.registry import registry

    return registry.get("architectures", spec.architecture)().expected_shapes(spec)


def validate(tensors: Mapping[str, torch.Tensor]) -> Any:
    """Check every expected key, shape and dtype; return the derived spec."""
    arch = detect_architecture(set(tensors))
    try:
        return arch.spec(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{arch.describe()} checkpoint: {exc}") from None


def load_checkpoint(name: str | Path) -> Checkpoint:
    """Resolve, read and validate a checkpoint (``.pth`` is memory-mapped, ``weights_only``); the
    ``time_state`` tensors of a "merged state" model go to :attr:`Checkpoint.tuned_state`."""
    from rwkvkit.formats.tuned_state import split_time_states, wkv_states

    path = resolve_path(name)
    tensors, tuned = split_time_states(_read_tensors(path))
    if tuned and not tensors:
        raise CheckpointError(f"{path}: holds only tuned states (blocks.N.att.time_state), no model: give it as the initial state (model.state=...)")
    try:
        spec = validate(tensors)
        if tuned:
            wkv_states(tuned, spec, CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return Checkpoint(path=path, spec=spec, tensors=tensors, tuned_state=tuned)
