"""Random RWKV checkpoints (RWKV-7, and RWKV-6/5/4 through ``architecture=``) with the exact key
layout of real World models, for tests, benchmarks and users who want a model without
downloading one.

Initialisation follows RWKV-LM's training code for each generation (decay/ICLR/value-residual
curves per channel, orthogonal LoRA factors; RWKV-4/5/6: time_mix/time_maa, decay and bonus
curves), plus noise on the parts that training would start at zero (LoRA factors, output and FFN
value matrices, norms), so that every path contributes to the logits and activations look like a
trained model's: no inf/NaN in fp16 over long runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from typing import Any

from rwkvkit.checkpoint import ModelSpec


def lora_ranks(n_embd: int) -> tuple[int, int, int, int]:
    """RWKV-LM's suggested LoRA ranks (decay, a, value, gate) for a width; 0.1B: 64, 64, 32, 128."""

    def rank(scale: float, power: float) -> int:
        return max(32, int(round(scale * n_embd**power / 32) * 32))

    return rank(1.8, 0.5), rank(1.8, 0.5), rank(1.3, 0.5), rank(0.6, 0.8)


ARCHITECTURES = ("rwkv7", "rwkv6", "rwkv5", "rwkv4")


def make_spec(
    n_layer: int = 2, n_embd: int = 128, vocab_size: int = 512, head_size: int = 64, dim_ffn: int | None = None, architecture: str = "rwkv7"
) -> Any:
    """The spec of a model of ``architecture`` with World-file proportions (FFN 4x for RWKV-7 and
    -4, 3.5x for -5/-6; RWKV-6's mix/decay LoRA ranks 32/64 as below 4096 channels)."""
    if architecture == "rwkv4":
        from rwkvkit.models.rwkv4 import Rwkv4Spec

        return Rwkv4Spec(n_layer, n_embd, vocab_size, dim_ffn or 4 * n_embd)
    if n_embd % head_size:
        raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    H = n_embd // head_size
    if architecture == "rwkv6":
        from rwkvkit.models.rwkv6 import Rwkv6Spec

        return Rwkv6Spec(n_layer, n_embd, H, head_size, vocab_size, dim_ffn or int(n_embd * 3.5) // 32 * 32, 32, 64)
    if architecture == "rwkv5":
        from rwkvkit.models.rwkv5 import Rwkv5Spec

        return Rwkv5Spec(n_layer, n_embd, H, head_size, vocab_size, dim_ffn or int(n_embd * 3.5) // 32 * 32)
    if architecture != "rwkv7":
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    w, a, v, g = lora_ranks(n_embd)
    return ModelSpec(n_layer, n_embd, H, head_size, vocab_size, dim_ffn or 4 * n_embd, w, a, v, g)


class _Init:
    """RWKV-LM's per-channel and per-layer curves, and random tensors from one seeded generator."""

    def __init__(self, spec: Any, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.C, self.L = spec.n_embd, spec.n_layer
        self.ddd = torch.arange(self.C, dtype=torch.float32) / self.C

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def uniform(self, *shape: int, bound: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=self.gen) * 2 - 1) * bound

    def vec(self, values: torch.Tensor, noise: float = 0.05) -> torch.Tensor:
        return (values + self.normal(self.C, std=noise)).reshape(1, 1, self.C)

    def ratios(self, i: int) -> tuple[float, float]:
        """``(ratio_0_to_1, ratio_1_to_almost0)`` of layer i."""
        return i / max(self.L - 1, 1), 1.0 - i / self.L

    def outer(self, V: int) -> dict[str, torch.Tensor]:
        C = self.C
        return {
            "emb.weight": self.uniform(V, C, bound=1.0),
            "blocks.0.ln0.weight": 1 + self.normal(C, std=0.1),
            "blocks.0.ln0.bias": self.normal(C, std=0.1),
            "ln_out.weight": 1 + self.normal(C, std=0.1),
            "ln_out.bias": self.normal(C, std=0.1),
            "head.weight": self.normal(V, C, std=0.5 / math.sqrt(C) * 4),  # wider logits than init, like a trained head
        }

    def block(self, p: str, F: int, att_matrices: tuple[str, ...], norms: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Norms, attention matrices (the output one last) and the receptance-gated FFN of RWKV-4/5/6."""
        C = self.C
        t = {}
        for name in norms:
            t[f"{p}{name}.weight"] = 1 + self.normal(C, std=0.1)
            t[f"{p}{name}.bias"] = self.normal(C, std=0.1)
        for name in att_matrices:
            t[f"{p}att.{name}.weight"] = self.uniform(C, C, bound=0.5 / math.sqrt(C))
        t[f"{p}att.output.weight"] = self.normal(C, C, std=0.5 / math.sqrt(C))
        t[f"{p}ffn.key.weight"] = self.uniform(F, C, bound=0.5 / math.sqrt(C))
        t[f"{p}ffn.receptance.weight"] = self.uniform(C, C, bound=0.5 / math.sqrt(C))
        t[f"{p}ffn.value.weight"] = self.normal(C, F, std=0.5 / math.sqrt(F))
        return t

    def decay_curve(self, i: int, low: float, span: float) -> torch.Tensor:
        """``low + span * (n / (C-1)) ** (0.7 + 1.3 * ratio_0_to_1)`` (RWKV-LM's ``decay_speed``)."""
        n = torch.arange(self.C, dtype=torch.float32)
        return low + span * (n / (self.C - 1)) ** (0.7 + 1.3 * self.ratios(i)[0])

    def bonus_curve(self, i: int) -> torch.Tensor:
        """RWKV-5/6's ``time_faaaa``: ``ratio_0_to_1 * (1 - n/(C-1)) + ((n+1) % 3 - 1) * 0.1``."""
        n = torch.arange(self.C, dtype=torch.float32)
        return self.ratios(i)[0] * (1 - n / (self.C - 1)) + ((n + 1) % 3 - 1) * 0.1


def _random_rwkv6(spec: Any, seed: int) -> dict[str, torch.Tensor]:
    init = _Init(spec, seed)
    C, H, N, R, D = spec.n_embd, spec.n_head, spec.head_size, spec.lora_mix, spec.lora_decay
    t = init.outer(spec.vocab_size)
    ddd = init.ddd
    for i in range(spec.n_layer):
        p = f"blocks.{i}."
        r01, r10 = init.ratios(i)
        t.update(init.block(p, spec.dim_ffn, ("receptance", "key", "value", "gate"), ("ln1", "ln2", "att.ln_x")))
        for name, power, shift in (("x", 1.0, 0.0), ("w", 1.0, 0.0), ("k", 1.0, 0.0), ("v", 1.0, 0.3 * r01), ("r", 0.5, 0.0), ("g", 0.5, 0.0)):
            t[f"{p}att.time_maa_{name}"] = init.vec(1.0 - (ddd.pow(power * r10) + shift))
        t[f"{p}att.time_maa_w1"] = init.normal(C, 5 * R, std=1.0 / math.sqrt(C))  # training starts these near 0: noise so each one matters
        t[f"{p}att.time_maa_w2"] = init.normal(5, R, C, std=0.1 / math.sqrt(R))
        t[f"{p}att.time_decay"] = init.vec(init.decay_curve(i, -6.0, 5.0), noise=0.3)
        t[f"{p}att.time_decay_w1"] = init.normal(C, D, std=1.0 / math.sqrt(C))
        t[f"{p}att.time_decay_w2"] = init.normal(D, C, std=0.3 / math.sqrt(D))
        t[f"{p}att.time_faaaa"] = (init.bonus_curve(i) + init.normal(C, std=0.05)).reshape(H, N)
        t[f"{p}ffn.time_maa_k"] = init.vec(1.0 - ddd.pow(r10))
        t[f"{p}ffn.time_maa_r"] = init.vec(1.0 - ddd.pow(r10))
    return t


def _random_rwkv5(spec: Any, seed: int) -> dict[str, torch.Tensor]:
    init = _Init(spec, seed)
    H, N = spec.n_head, spec.head_size
    t = init.outer(spec.vocab_size)
    ddd = init.ddd
    for i in range(spec.n_layer):
        p = f"blocks.{i}."
        r01, r10 = init.ratios(i)
        t.update(init.block(p, spec.dim_ffn, ("receptance", "key", "value", "gate"), ("ln1", "ln2", "att.ln_x")))
        for name, power, shift in (("k", 1.0, 0.0), ("v", 1.0, 0.3 * r01), ("r", 0.5, 0.0), ("g", 0.5, 0.0)):
            t[f"{p}att.time_mix_{name}"] = init.vec(ddd.pow(power * r10) + shift)
        t[f"{p}att.time_decay"] = (init.decay_curve(i, -6.0, 5.0) + init.normal(spec.n_embd, std=0.3)).reshape(H, N)
        t[f"{p}att.time_faaaa"] = (init.bonus_curve(i) + init.normal(spec.n_embd, std=0.05)).reshape(H, N)
        t[f"{p}ffn.time_mix_k"] = init.vec(ddd.pow(r10))
        t[f"{p}ffn.time_mix_r"] = init.vec(ddd.pow(r10))
    return t


def _random_rwkv4(spec: Any, seed: int) -> dict[str, torch.Tensor]:
    init = _Init(spec, seed)
    C = spec.n_embd
    n = torch.arange(C, dtype=torch.float32)
    t = init.outer(spec.vocab_size)
    ddd = init.ddd
    for i in range(spec.n_layer):
        p = f"blocks.{i}."
        r01, r10 = init.ratios(i)
        t.update(init.block(p, spec.dim_ffn, ("receptance", "key", "value"), ("ln1", "ln2")))
        t[f"{p}att.time_decay"] = init.decay_curve(i, -5.0, 8.0) + init.normal(C, std=0.3)
        t[f"{p}att.time_first"] = math.log(0.3) + ((n + 1) % 3 - 1) * 0.5 + init.normal(C, std=0.05)
        for name, power, shift in (("k", 1.0, 0.0), ("v", 1.0, 0.3 * r01), ("r", 0.5, 0.0)):
            t[f"{p}att.time_mix_{name}"] = init.vec(ddd.pow(power * r10) + shift)
        t[f"{p}ffn.time_mix_k"] = init.vec(ddd.pow(r10))
        t[f"{p}ffn.time_mix_r"] = init.vec(ddd.pow(r10))
    return t


def random_checkpoint(spec: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict for ``spec`` (any generation's, see :func:`make_spec`) with every key a real
    World file has (RWKV-7: ``v0/v1/v2`` in layer 0 too)."""
    others = {"rwkv6": _random_rwkv6, "rwkv5": _random_rwkv5, "rwkv4": _random_rwkv4}
    if spec.architecture in others:
        return {k: v.to(dtype).contiguous() for k, v in others[spec.architecture](spec, seed).items()}
    gen = torch.Generator().manual_seed(seed)
    C, H, N, V, L = spec.n_embd, spec.n_head, spec.head_size, spec.vocab_size, spec.n_layer

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def uniform(*shape: int, bound: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

    def ortho(rows: int, cols: int, scale: float) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen))
        q = q if rows >= cols else q.T
        return q * scale * (math.sqrt(rows / cols) if rows > cols else 1.0)

    def vec(values: torch.Tensor, noise: float = 0.05) -> torch.Tensor:
        return (values + normal(C, std=noise)).reshape(1, 1, C)

    ch = torch.arange(C, dtype=torch.float32)
    linear = ch / (C - 1) - 0.5
    zigzag = ((ch % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    ddd = ch / C

    t: dict[str, torch.Tensor] = {
        "emb.weight": uniform(V, C, bound=1.0),
        "blocks.0.ln0.weight": 1 + normal(C, std=0.1),
        "blocks.0.ln0.bias": normal(C, std=0.1),
    }
    for i in range(L):
        p = f"blocks.{i}."
        r01 = i / max(L - 1, 1)
        r10 = 1.0 - i / L
        for name in ("ln1", "ln2", "att.ln_x"):
            t[f"{p}{name}.weight"] = 1 + normal(C, std=0.1)
            t[f"{p}{name}.bias"] = normal(C, std=0.1)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            t[f"{p}att.{name}"] = vec(1.0 - ddd.pow(power * r10))
        decay = -6 + 6 * (ch / (C - 1)) ** (1 + r01**0.3)
        t[f"{p}att.w0"] = vec(decay + 0.5 + zigzag * 2.5, noise=0.3)
        t[f"{p}att.a0"] = vec(-0.19 + zigzag * 0.3 + linear * 0.4)
        t[f"{p}att.v0"] = vec(0.73 - linear * 0.4)
        for name, rank in (("w", spec.lora_w), ("a", spec.lora_a), ("v", spec.lora_v), ("g", spec.lora_g)):
            t[f"{p}att.{name}1"] = normal(C, rank, std=1.0 / math.sqrt(C))
            t[f"{p}att.{name}2"] = ortho(rank, C, 1.0)
        t[f"{p}att.k_k"] = vec(0.71 - linear * 0.1)
        t[f"{p}att.k_a"] = vec(torch.full((C,), 1.02))
        t[f"{p}att.r_k"] = -0.04 + normal(H, N, std=0.5)
        t[f"{p}att.receptance.weight"] = uniform(C, C, bound=0.5 / math.sqrt(C))
        t[f"{p}att.key.weight"] = uniform(C, C, bound=0.5 / math.sqrt(C))
        t[f"{p}att.value.weight"] = uniform(C, C, bound=0.5 / math.sqrt(C))
        t[f"{p}att.output.weight"] = normal(C, C, std=0.5 / math.sqrt(C))
        t[f"{p}ffn.x_k"] = vec(1.0 - ddd.pow(r10**4))
        t[f"{p}ffn.key.weight"] = uniform(spec.dim_ffn, C, bound=0.5 / math.sqrt(C))
        t[f"{p}ffn.value.weight"] = normal(C, spec.dim_ffn, std=0.5 / math.sqrt(spec.dim_ffn))
    t["ln_out.weight"] = 1 + normal(C, std=0.1)
    t["ln_out.bias"] = normal(C, std=0.1)
    t["head.weight"] = normal(V, C, std=0.5 / math.sqrt(C) * 4)  # wider logits than init, like a trained head
    return {k: v.to(dtype).contiguous() for k, v in t.items()}


def save_checkpoint(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as ``.pth`` or ``.safetensors`` (chosen by the suffix)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def make_checkpoint(
    path: str | Path, n_layer: int = 2, n_embd: int = 128, vocab_size: int = 512, seed: int = 0, dtype: torch.dtype = torch.float32, architecture: str = "rwkv7"
) -> Path:
    """Create a random checkpoint file (RWKV-7 unless ``architecture`` says otherwise) in one call."""
    return save_checkpoint(random_checkpoint(make_spec(n_layer, n_embd, vocab_size, architecture=architecture), seed, dtype), path)


def memory_probe(path: str, strategy: str, prefill: int = 512, decode: int = 5) -> dict[str, float]:
    """Load ``path`` with ``strategy``, prefill ``prefill`` random tokens, decode ``decode`` more;
    RSS after the load and at the end, peak RSS at both points, and the prepared weights (MB).
    Meaningful only in a fresh process: see :func:`measure_memory`."""
    from rwkvkit import RWKV
    from rwkvkit.memory import rss_mb

    model = RWKV(path, strategy)
    rss_load, peak_load = rss_mb()
    tokens = torch.randint(0, model.spec.vocab_size, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    out, state = model.forward(tokens, None)
    for _ in range(decode):
        out, state = model.forward([int(out.argmax())], state)
    rss_end, peak_end = rss_mb()
    return {"rss_load": rss_load, "peak_load": peak_load, "rss_end": rss_end, "peak_end": peak_end, "weights": model.weight_bytes() / 2**20}


def measure_memory(path: str | Path, strategy: str, cache: str | Path, threads: int = 2, **probe: int) -> dict[str, float]:
    """:func:`memory_probe` in a fresh Python process using the rwkvkit cache ``cache`` (so a
    cold or warm int8 cache is the caller's choice), with ``threads`` torch threads."""
    import json
    import os
    import subprocess
    import sys

    code = "import json, sys, torch; from rwkvkit.testing import memory_probe; torch.set_num_threads(int(sys.argv[1])); print(json.dumps(memory_probe(*sys.argv[2:4], **json.loads(sys.argv[4]))))"
    env = {**os.environ, "RWKVKIT_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", code, str(threads), str(path), strategy, json.dumps(probe)], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory probe of {strategy!r} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])
