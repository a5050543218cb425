"""Reading RWKV checkpoints: find the file, load tensors lazily, detect the architecture from the
keys, derive the model's dimensions from shapes, and validate every key before any math runs.

Every failure is a :class:`CheckpointError` naming the file and the key, because a KeyError deep in
a forward pass tells a user nothing about which file is wrong.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from rwkvkit import pages
from rwkvkit.errors import CheckpointError
from rwkvkit.paths import candidates, model_file

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of an RWKV-7 model, all derived from tensor shapes."""

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
    spec: ModelSpec
    tensors: dict[str, torch.Tensor]
    merged: tuple[str, ...] = ()  # what was merged into the weights at load (LoRA digests)

    def fingerprint(self) -> str:
        """A content fingerprint that is cheap for any model size: sha256 over the spec, what was
        merged in, and the bytes of every small (≤ 1-D-sized) tensor the model reads. Two
        checkpoints with the same shapes but different weights differ in their per-channel vectors,
        so states cannot be mixed up; the same model in another file format has the same one."""
        h = hashlib.sha256(repr(astuple(self.spec)).encode())
        for item in self.merged:
            h.update(item.encode())
        for key in sorted(set(self.tensors) - set(_OPTIONAL)):
            t = self.tensors[key]
            if t.numel() <= self.spec.n_embd * self.spec.head_size:
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


def detect_version(keys: set[str]) -> int:
    """RWKV generation from the key names alone (each generation renamed its time-mix params)."""
    if "emb.weight" not in keys or not any(_BLOCK_KEY.match(k) for k in keys):
        raise CheckpointError("no 'emb.weight' / 'blocks.N.*' keys: this is not an RWKV checkpoint")
    if "blocks.0.att.r_k" in keys or "blocks.0.att.x_r" in keys:
        return 7
    if "blocks.0.att.time_maa_x" in keys:
        return 6
    if "blocks.0.att.time_faaaa" in keys or "blocks.0.att.ln_x.weight" in keys:
        return 5
    if "blocks.0.att.time_first" in keys:
        return 4
    raise CheckpointError("RWKV-like keys but an unrecognised architecture (no v4/v5/v6/v7 time-mix keys)")


def _spec_from_shapes(t: Mapping[str, torch.Tensor]) -> ModelSpec:
    def shape(key: str, what: str) -> tuple[int, ...]:
        """The shape of ``key``, which must be 2-D (``what`` names its two dimensions)."""
        if key not in t:
            raise CheckpointError(f"missing key {key!r}")
        if t[key].dim() != 2 or 0 in t[key].shape:
            raise CheckpointError(f"key {key!r} has shape {list(t[key].shape)}; expected a non-empty 2-D tensor [{what}]")
        return tuple(t[key].shape)

    vocab, n_embd = shape("emb.weight", "vocab_size, n_embd")
    n_head, head_size = shape("blocks.0.att.r_k", "n_head, head_size")
    if n_head * head_size != n_embd:
        raise CheckpointError(f"key 'blocks.0.att.r_k' has shape {[n_head, head_size]}; expected [n_head, head_size] with product {n_embd}")
    n_layer = 1 + max(int(m.group(1)) for k in t if (m := _BLOCK_KEY.match(k)))
    return ModelSpec(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        head_size=head_size,
        vocab_size=vocab,
        dim_ffn=shape("blocks.0.ffn.key.weight", "dim_ffn, n_embd")[0],
        lora_w=shape("blocks.0.att.w1", "n_embd, rank")[-1],
        lora_a=shape("blocks.0.att.a1", "n_embd, rank")[-1],
        lora_v=shape("blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.v1", "n_embd, rank")[-1],
        lora_g=shape("blocks.0.att.g1", "n_embd, rank")[-1],
    )


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-7 checkpoint with its shape, as real World model files store them."""
    C, V, F, H, N = spec.n_embd, spec.vocab_size, spec.dim_ffn, spec.n_head, spec.head_size
    vec = (1, 1, C)
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    for i in range(spec.n_layer):
        p = f"blocks.{i}."
        for name in ("ln1", "ln2", "att.ln_x"):
            shapes[f"{p}{name}.weight"] = (C,)
            shapes[f"{p}{name}.bias"] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            shapes[f"{p}att.{name}"] = vec
        for name, rank in (("w", spec.lora_w), ("a", spec.lora_a), ("v", spec.lora_v), ("g", spec.lora_g)):
            shapes[f"{p}att.{name}1"] = (C, rank)
            shapes[f"{p}att.{name}2"] = (rank, C)
        shapes[f"{p}att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[f"{p}att.{name}.weight"] = (C, C)
        shapes[f"{p}ffn.x_k"] = vec
        shapes[f"{p}ffn.key.weight"] = (F, C)
        shapes[f"{p}ffn.value.weight"] = (C, F)
    return shapes


# Layer 0 takes v_first from its own value projection, so real files carry unused v0/v1/v2 there
# (some exporters drop them); the value-residual rank is then read from layer 1.
_OPTIONAL = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def validate(tensors: Mapping[str, torch.Tensor]) -> ModelSpec:
    """Check every expected key, shape and dtype; return the derived spec."""
    version = detect_version(set(tensors))
    if version != 7:
        raise CheckpointError(f"RWKV-{version} checkpoints are not supported yet (rwkvkit runs RWKV-7 'x070' models)")
    spec = _spec_from_shapes(tensors)
    expected = expected_shapes(spec)
    for key, shape in expected.items():
        if key not in tensors:
            if key in _OPTIONAL:
                continue
            raise CheckpointError(f"missing key {key!r} (expected shape {list(shape)})")
        t = tensors[key]
        if tuple(t.shape) != shape and not (len(shape) == 3 and tuple(t.shape) == shape[-1:]):
            raise CheckpointError(f"key {key!r} has shape {list(t.shape)}; expected {list(shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"key {key!r} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"unexpected key(s) {shown}: an RWKV-7 variant rwkvkit does not run (e.g. DeepEmbed), or a damaged file"
        )
    return spec


def load_checkpoint(name: str | Path) -> Checkpoint:
    """Resolve, read and validate a checkpoint (``.pth`` is memory-mapped, ``weights_only``)."""
    path = resolve_path(name)
    tensors = _read_tensors(path)
    try:
        spec = validate(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return Checkpoint(path=path, spec=spec, tensors=tensors)
