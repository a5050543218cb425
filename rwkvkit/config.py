"""Structured configs for ``rwkvkit run``: typed schemas in Hydra's ConfigStore, so
``token_count=abc`` fails while composing, before any model loads.

The YAML files in ``conf/`` (installed as ``rwkvkit.conf``) fill these schemas; ranges (``top_p``
in [0, 1] and so on) are checked by the sampler and penalty constructors, also before loading.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rwkvkit.errors import InputError
from rwkvkit.help import help_node
from rwkvkit.interfaces import Sampler
from rwkvkit.penalties import Penalties
from rwkvkit.resolve import resolve_sampler
from rwkvkit.stops import split_stops


def key(default: Any = MISSING, meaning: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its meaning, shown by ``rwkvkit run --help`` (rwkvkit.help)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": meaning})
    return field(default=default, metadata={"help": meaning})


@dataclass
class LoraFile:
    path: str = key(MISSING, "a LoRA adapter file (.pth/.safetensors with *.lora_A/*.lora_B)")
    alpha: float = key(MISSING, "the lora_alpha it was trained with (W += B @ A * alpha / r)")


@dataclass
class ChatTemplateConfig:
    """The RWKV World chat format, ``System: ...\n\nUser: ...\n\nAssistant:`` (rwkvkit.server.template)."""

    system: str = key("System", "the name system messages are rendered with")
    user: str = key("User", "the name user messages are rendered with")
    assistant: str = key("Assistant", "the name replies are rendered with; the prompt ends with it and ':'")
    separator: str = key("\n\n", "between messages; a reply stops at separator + user name + ':'")


@dataclass
class ModelConfig:
    path: str = key(MISSING, "checkpoint file (.pth or .safetensors, suffix optional), a Hugging Face model folder, a pkg://package/file path, or a model config name (demo)")
    tokenizer: str = key("rwkv_vocab_v20230424", "a registered tokenizer name, a tokenizer.json path (pkg:// allowed), or a model folder holding one")
    state: Optional[str] = key(None, "a state-tuned initial state (.pth/.safetensors with blocks.N.att.time_state); null starts from the model's own (zeros, or the state a merged-state model file carries)")
    lora: List[LoraFile] = key(meaning="LoRA adapters merged into the weights at load, e.g. 'model.lora=[{path: a.pth, alpha: 32}]'", factory=list)
    chat: ChatTemplateConfig = key(factory=ChatTemplateConfig)


@dataclass
class StrategyConfig:
    spec: str = key("cpu fp32", "a ChatRWKV strategy string, e.g. 'cuda fp16 *12 -> cpu fp32'")
    backend: str = key("auto", "the implementation: auto (fastest available), cpu, int8, cuda or torch")
    threads: Optional[int] = key(None, "CPU threads (torch.set_num_threads); null keeps torch's default")


@dataclass
class SamplingConfig:
    name: str = key("nucleus", "the sampler: nucleus, greedy, min_p, typical or a plugin's (rwkvkit plugins)")
    temperature: float = key(1.0, "softmax temperature; 0 is greedy")
    top_p: float = key(0.85, "nucleus cutoff in [0, 1]")
    top_k: int = key(0, "keep only the k most probable tokens; 0 keeps all")
    min_p: float = key(0.05, "min_p sampler: keep tokens with p >= min_p * p_max")
    typical_p: float = key(0.95, "typical sampler: mass of locally typical tokens kept")
    options: Dict[str, Any] = key(meaning="extra options for plugin samplers, e.g. sampling.options.a=0.3", factory=dict)
    alpha_frequency: float = key(0.2, "penalty per earlier occurrence of a token")
    alpha_presence: float = key(0.2, "penalty for a token that occurred at all")
    alpha_decay: float = key(0.996, "per-token decay of the penalties")
    token_ban: List[int] = key(meaning="token ids never generated", factory=list)
    token_stop: List[Any] = key(meaning='token ids and/or stop strings that end generation, e.g. [0,"\\n\\n"]', factory=list)
    chunk_len: Optional[int] = key(None, "prompt tokens per forward call; null: chosen for speed within a memory bound")


@dataclass
class CallbacksConfig:
    names: List[str] = key(meaning="callbacks: stdout, metrics, progress, jsonl (generation.jsonl in the run directory)", factory=lambda: ["stdout", "metrics"])


@dataclass
class ConstraintConfig:  # at most one is set (rwkvkit.constraints.constraint_spec)
    json_schema: Optional[str] = key(None, "a JSON schema file: the output is JSON valid against it")
    regex: Optional[str] = key(None, "a regex the whole output matches")
    grammar: Optional[str] = key(None, "a grammar file (Lark, or GBNF with root ::= ...): the output parses with it")


@dataclass
class EngineConfig:
    max_batch: int = key(64, "prompts_file: sequences generated at once (the rest wait for a slot)")
    prefill_budget: Optional[int] = key(512, "prompts_file: prompt tokens one step may prefill while the others decode; null: no limit")
    cache_mb: int = key(0, "prompts_file: prompt-state cache size in MiB (a prompt starts from its longest cached prefix); 0: off")


@dataclass
class ModelGroups:
    """The groups every app composes (run, serve, chat): which model, how it runs, how it samples."""

    model: ModelConfig = key(factory=ModelConfig)
    strategy: StrategyConfig = key(factory=StrategyConfig)
    sampling: SamplingConfig = key(factory=SamplingConfig)


@dataclass
class RunConfig(ModelGroups):
    callbacks: CallbacksConfig = key(factory=CallbacksConfig)
    constraint: ConstraintConfig = key(factory=ConstraintConfig)
    engine: EngineConfig = key(factory=EngineConfig)
    prompt: str = key("\nOnce upon a time,", "the prompt text (taken literally, see Quoting)")
    prompt_file: Optional[str] = key(None, "read the prompt from this UTF-8 file instead")
    prompts_file: Optional[str] = key(None, 'generate for every prompt of this JSONL file in one batched run: lines {"prompt": ..., "seed": ...} (see rwkvkit.prompts_file)')
    token_count: int = key(200, "tokens to generate at most")
    seed: int = key(42, "sampling seed: the same config and seed give the same text")


JOB_LOGGING = {  # a run's log goes to run.log only: the terminal shows the text and rwkvkit's own lines
    "version": 1,
    "formatters": {"simple": {"format": "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"}},
    "handlers": {"file": {"class": "logging.FileHandler", "formatter": "simple", "filename": "${hydra.runtime.output_dir}/${hydra.job.name}.log"}},
    "root": {"level": "INFO", "handlers": ["file"]},
    "disable_existing_loggers": False,
}


def register_configs() -> None:
    """Put the run schema (the YAML files in conf/ fill it, typed), its help page and the job
    logging into Hydra's ConfigStore (conf/run.yaml selects them); ``serve`` and ``chat`` add
    theirs with :func:`rwkvkit.server.config.register_configs`."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="hydra/help", name="rwkvkit", node=help_node(RunConfig))
    cs.store(group="hydra/job_logging", name="rwkvkit", node=JOB_LOGGING)


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
