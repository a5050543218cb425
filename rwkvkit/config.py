"""Structured configs for ``rwkvkit run``: typed schemas in Hydra's ConfigStore, so
``token_count=abc`` fails while composing, before any model loads.

The YAML files in ``conf/`` (installed as ``rwkvkit.conf``) fill these schemas; ranges (``top_p``
in [0, 1] and so on) are checked by the sampler and penalty constructors, also before loading.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rwkvkit.errors import InputError
from rwkvkit.interfaces import Sampler
from rwkvkit.penalties import Penalties
from rwkvkit.resolve import resolve_sampler
from rwkvkit.stops import split_stops

@dataclass
class ModelConfig:
    path: str = MISSING  # a file path, or pkg://package/file for a file shipped in a package (see rwkvkit.resolve)
    tokenizer: str = "rwkv_vocab_v20230424"  # a registered tokenizer name or a tokenizer.json path


@dataclass
class StrategyConfig:
    spec: str = "cpu fp32"  # a ChatRWKV strategy string
    backend: str = "auto"
    threads: Optional[int] = None  # torch.set_num_threads; None keeps torch's default


@dataclass
class SamplingConfig:
    name: str = "nucleus"  # a registered sampler
    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    min_p: float = 0.05
    typical_p: float = 0.95
    options: Dict[str, Any] = field(default_factory=dict)  # extra options for plugin samplers
    alpha_frequency: float = 0.2
    alpha_presence: float = 0.2
    alpha_decay: float = 0.996
    token_ban: List[int] = field(default_factory=list)
    token_stop: List[Any] = field(default_factory=list)  # token ids (ChatRWKV) and/or stop strings, e.g. [0, "\n\n"]
    chunk_len: Optional[int] = None  # prompt tokens per forward call; null: chosen for speed (bounded memory)


@dataclass
class CallbacksConfig:
    names: List[str] = field(default_factory=lambda: ["stdout", "metrics"])


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    prompt: str = "\n"
    prompt_file: Optional[str] = None
    token_count: int = 200
    seed: int = 42


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (the YAML files extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in (("model", ModelConfig), ("strategy", StrategyConfig), ("sampling", SamplingConfig), ("callbacks", CallbacksConfig)):
        cs.store(group=group, name=f"{group}_schema", node=node)


def make_sampler(cfg: SamplingConfig) -> Sampler:
    """The configured sampler; it takes whichever of the common fields its factory accepts
    (``temperature``, ``top_p``, ...) plus ``options``."""
    from rwkvkit.registry import registry

    factory = registry.get("samplers", cfg.name)
    accepted = inspect.signature(factory).parameters
    common = {k: getattr(cfg, k) for k in ("temperature", "top_p", "top_k", "min_p", "typical_p") if k in accepted}
    try:
        return resolve_sampler(cfg.name, {**common, **dict(cfg.options)})
    except InputError as exc:
        raise InputError(f"sampling: {exc}") from None


def make_penalties(cfg: SamplingConfig, vocab_size: int | None = None) -> Penalties:
    penalties = Penalties(cfg.alpha_presence, cfg.alpha_frequency, cfg.alpha_decay, list(cfg.token_ban))
    if vocab_size is not None:
        penalties.check(vocab_size)
    return penalties


def make_stops(cfg: SamplingConfig) -> list[int | str]:
    """``token_stop`` as ``generate``'s ``stop_tokens``, checked (``List[Any]`` lets any value through
    composition, so floats, booleans and nulls are refused here, before a model loads)."""
    stops = list(cfg.token_stop)
    split_stops(stops, "sampling.token_stop")
    return stops
