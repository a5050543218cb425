"""``rwkvkit run``: one generation from a composed Hydra config, recorded in its run directory.

The run directory (Hydra's output dir, new for each run: see rwkvkit.rundir) receives
``config.yaml`` (resolved, with the prompt used), ``run.json`` (seed, prompt, model path, sha256
and fingerprint, strategy, the backends that ran, versions, status: ``completed``, ``failed``
with the error, ``interrupted`` or ``terminated``, stop reason), ``run.log`` (the summary, and the
traceback of an unexpected error), and once generation has begun ``output.txt`` and
``metrics.json``. Everything a user can get wrong is checked before the model loads. A single run
ends with one line on stderr: tokens, speed, stop reason and the run directory.

With ``prompts_file`` (see rwkvkit.prompts_file) every prompt of a JSONL file runs in one batched
engine run: ``results.jsonl`` replaces ``output.txt`` (one line per prompt, in file order: its
text, tokens, stop reason and metrics), ``metrics.json`` holds the totals and the engine's memory,
and one progress bar counts prompts and tokens. The single-stream callbacks (``stdout``,
``progress``, ``jsonl``) are replaced by these; any other configured callback gets one instance per
prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import rwkvkit
from rwkvkit.argv import shown
from rwkvkit.errors import fail, report
from rwkvkit import memory
from rwkvkit.config import RunConfig, make_penalties, make_sampler, make_stops
from rwkvkit.engine import Engine, Handle, Request, check_limits
from rwkvkit.constraints import constraint_maker, constraint_spec
from rwkvkit.errors import InputError, PluginError, RunDirError, RwkvkitError, StrategyError, SweepError, stop_of
from rwkvkit.formats.lora import Lora, as_loras
from rwkvkit.interfaces import Callback
from rwkvkit.model import Model
from rwkvkit.native import cache_dir, write_atomically
from rwkvkit.paths import candidates, model_file
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.prompts_file import BatchProgress, PromptLine, batch_metrics, constraint_makers, read_prompts, result_record
from rwkvkit.registry import registry
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.rundir import write_json, write_text
from rwkvkit.state import State

_SINGLE_STREAM = ("stdout", "progress", "jsonl", "metrics")  # replaced in a prompts_file run (see above)
SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)  # Hydra's job logging writes it to run.log (see rwkvkit.config)


def file_sha256(path: Path) -> str:
    """sha256 of a checkpoint, cached by (path, size, mtime) so large files are hashed once.

    The cache only saves time: a damaged index is ignored and rewritten, an unwritable one skipped.
    """
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = cache_dir() / "sha256.json"
    known = _read_sha256_index(index)
    if key not in known:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        with contextlib.suppress(OSError):
            write_atomically(index, lambda tmp: tmp.write_text(json.dumps(known, indent=1)))
    return known[key]


def checkpoint_sha256(path: Path) -> str:
    """:func:`file_sha256` of a checkpoint file; for a model folder, sha256 over its config.json
    and weight files' names and hashes."""
    if not path.is_dir():
        return file_sha256(path)
    from rwkvkit.formats.hf import CONFIG, weight_files

    digest = hashlib.sha256()
    for file in [path / CONFIG, *weight_files(path)]:
        digest.update(f"{file.name} {file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _read_sha256_index(index: Path) -> dict[str, str]:
    """The cached hashes; a missing, unreadable or damaged index (or entry) counts as empty."""
    try:
        known = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(v, str) and SHA256.fullmatch(v)}


class _Recorder(Callback):
    """Keeps the text generated so far, so an interrupted run still leaves its output."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.tokens: list[int] = []

    def on_token(self, token: int) -> None:
        self.tokens.append(token)

    def on_text(self, piece: str) -> None:
        self.pieces.append(piece)

    def on_end(self, result: Any) -> None:
        """The result's own tokens and text, which every callback's end sees: a signal landing
        after the engine recorded a token and before this callback heard of it left run.json one
        token short of generation.jsonl's end record."""
        self.tokens, self.pieces = list(result.tokens), [result.text]


def _origin(key: str, group: str) -> str:
    """Which config set ``key``: a command-line override or the chosen group option."""
    hc = HydraConfig.get()
    if any(o.split("=", 1)[0].lstrip("+~") == key for o in hc.overrides.task):
        return f"the command-line override {key}=..."
    return f"{key} in {group}={hc.runtime.choices.get(group)}"


def _check_prompt_source(cfg: DictConfig) -> None:
    """``prompts_file`` is the whole input of a run: a prompt given too is an error, not ignored."""
    if cfg.prompts_file is None:
        return
    given = [k for k in ("prompt", "prompt_file") if cfg[k] != getattr(RunConfig, k)]
    if given:
        raise RwkvkitError(f"{' and '.join(given)} and prompts_file are both given: prompts_file={cfg.prompts_file} holds every prompt of the run; give one or the other")


def _take_prompt_file(cfg: DictConfig) -> None:
    """Put prompt_file's text into ``cfg.prompt``, so config.yaml and run.json show the prompt used."""
    if cfg.prompt_file is None:
        return
    path = Path(cfg.prompt_file).expanduser()
    try:
        cfg.prompt = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RwkvkitError(f"prompt_file={cfg.prompt_file}: cannot read it as UTF-8 text ({exc.__class__.__name__}: {exc})") from None


def _check_engine(cfg: DictConfig) -> None:
    check_limits(cfg.engine.max_batch, cfg.engine.prefill_budget, ("engine.max_batch", "engine.prefill_budget"))
    if cfg.engine.cache_mb < 0:
        raise RwkvkitError(f"engine.cache_mb={cfg.engine.cache_mb}: expected an integer >= 0 (0: no prompt cache)")


def _check_device(cfg: DictConfig) -> None:
    if "cuda" in cfg.strategy.spec and not torch.cuda.is_available():
        choice = HydraConfig.get().runtime.choices.get("strategy")
        raise RwkvkitError(f"strategy={choice} ('{cfg.strategy.spec}'): no CUDA device found; try strategy=cpu_fp32")


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise StrategyError(f"strategy.threads={threads}: expected a positive integer, or null for torch's default")


def _make_callbacks(names: list[str], out_dir: Path) -> list[Callback]:
    """The configured callbacks besides metrics (always on); jsonl writes into the run directory.
    Without ``progress`` a prefill-only bar is added: a long prompt may take minutes, and that bar
    draws nothing for a prompt read in one chunk."""
    try:
        factories = {name: registry.get("callbacks", name) for name in names}
    except PluginError as exc:
        raise PluginError(f"callbacks.names: {exc}") from None
    callbacks = [factories[n](out_dir / "generation.jsonl") if n == "jsonl" else factories[n]() for n in names if n != "metrics"]
    if "progress" not in names:  # a long prompt's prefill still gets its bar
        callbacks.append(registry.get("callbacks", "progress")(decode=False))
    return callbacks


def _prepare(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Everything that can fail on bad input, checked before loading the model."""
    sampler = make_sampler(cfg.sampling)
    make_penalties(cfg.sampling)  # range checks; ids are checked against the vocabulary later
    stops = make_stops(cfg.sampling)
    constraint = constraint_spec(**cfg.constraint)
    callbacks = _make_callbacks(list(cfg.callbacks.names), out_dir)
    return {"sampler": sampler, "stops": stops, "constraint": constraint, "callbacks": callbacks, "model_path": check_model(cfg)}


def check_model(cfg: DictConfig) -> Path:
    """The checkpoint's path, once it and the strategy's device and threads are checked (before
    loading; shared by ``rwkvkit run``, ``serve`` and ``chat``)."""
    _check_threads(cfg.strategy.threads)
    model_path = model_file(cfg.model.path)
    if not any(c.exists() for c in candidates(model_path)):
        raise RwkvkitError(f"model file not found: {model_path} (set by {_origin('model.path', 'model')})")
    files = [("model.lora", lora.path) for lora in _loras(cfg)] + ([("model.state", Path(cfg.model.state).expanduser())] if cfg.model.state else [])
    for key, path in files:
        if not path.is_file():
            raise RwkvkitError(f"{key}: file not found: {path}")
    _check_device(cfg)
    return model_path


def _loras(cfg: DictConfig) -> list[Lora]:
    try:
        return as_loras(OmegaConf.to_container(cfg.model.lora))
    except InputError as exc:
        raise InputError(f"model.lora: {exc}") from None


def load_model(cfg: DictConfig, model_path: Path) -> Model:
    """The configured model (an ``RWKV``, LoRA adapters merged), ``strategy.threads`` applied;
    shared by ``rwkvkit run``, ``serve`` and ``chat``."""
    from rwkvkit.compat import RWKV

    if cfg.strategy.threads:
        torch.set_num_threads(cfg.strategy.threads)
    return RWKV(model_path, cfg.strategy.spec, backend=cfg.strategy.backend, lora=_loras(cfg))


def initial_state(cfg: DictConfig, model: Model) -> State | None:
    """The state-tuned initial state ``model.state`` names, or None (zeros)."""
    return State.from_tuned(cfg.model.state, model) if cfg.model.state else None


def _load(cfg: DictConfig, model_path: Path, record: _Record) -> Model:
    """The model, recorded in run.json (checkpoint hashes, the backends that run it)."""
    model = load_model(cfg, model_path)
    path = model.checkpoint_path
    backends = ", ".join(dict.fromkeys(stage.ops.name for stage in model.stages))
    record.info.update(model_path=str(path), model_sha256=checkpoint_sha256(path), model_fingerprint=model.fingerprint, backend=backends)
    return model


@dataclass
class _Record:
    """What the run directory says about the run, written however the run ends."""

    out_dir: Path
    info: dict[str, Any]
    recorder: _Recorder = field(default_factory=_Recorder)
    metrics: Callback = field(default_factory=lambda: registry.get("callbacks", "metrics")())  # its .metrics dict
    generating: bool = False
    stop_reason: str | None = None  # generate's, once it returns

    def write(self, status: str, error: str | None = None) -> dict[str, float]:
        """run.json, and the output + metrics.json once generation has begun; returns the metrics."""
        metrics: dict[str, float] = {}
        outcome: dict[str, Any] = {"status": status} if error is None else {"status": status, "error": error}
        if self.generating:
            metrics = {**self.write_output(), "peak_memory_mb": memory.peak_mb()}
            write_json(self.out_dir / "metrics.json", metrics)
            outcome.update(self.ending(status))
        write_json(self.out_dir / "run.json", {**self.info, **outcome, **self.produced()})
        return metrics

    def write_output(self) -> dict[str, float]:
        """output.txt; returns the generation's metrics."""
        write_text(self.out_dir / "output.txt", "".join(self.recorder.pieces))
        return {**self.metrics.metrics, "generated_tokens": len(self.recorder.tokens)}

    def ending(self, status: str) -> dict[str, Any]:
        """How generation ended, for run.json."""
        return {"stop_reason": self.stop_reason or ("error" if status == "failed" else status)}

    def produced(self) -> dict[str, Any]:
        """What generation made so far, for run.json."""
        return {"tokens": self.recorder.tokens}

    def summary(self, metrics: dict[str, float]) -> str:
        return f"{metrics.get('generated_tokens', 0)} tokens, {metrics.get('decode_tok_per_s', 0.0):.1f} tok/s, stop: {self.stop_reason}"


@dataclass
class _BatchRecord(_Record):
    """A prompts_file run: results.jsonl (one line per prompt, in file order) instead of output.txt."""

    lines: list[PromptLine] = field(default_factory=list)
    handles: list[Handle] = field(default_factory=list)  # lines[i]'s, once submitted
    engine: Engine | None = None
    started: float = 0.0

    def write_output(self) -> dict[str, float]:
        records = [result_record(line, handle) for line, handle in zip(self.lines, self.handles)]
        write_text(self.out_dir / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        metrics = batch_metrics(records, time.perf_counter() - self.started)
        if self.engine is not None:
            metrics.update(self.engine.memory().metrics())
        return metrics

    def ending(self, status: str) -> dict[str, Any]:
        return {"stop_reasons": dict(Counter(h.result.stop_reason for h in self.handles if h.result is not None))}

    def produced(self) -> dict[str, Any]:
        return {"prompts": len(self.lines)}

    def summary(self, metrics: dict[str, float]) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.ending("completed")["stop_reasons"].items())
        return (
            f"{metrics.get('prompts', 0)} prompts ({reasons}), {metrics.get('generated_tokens', 0)} tokens, "
            f"{metrics.get('generated_tok_per_s', 0.0):.1f} tok/s"
        )


def _generate(cfg: DictConfig, record: _Record) -> None:
    from rwkvkit.generation import generate

    job = _prepare(cfg, record.out_dir)
    tokenizer = resolve_tokenizer(cfg.model.tokenizer)
    origin = " ".join(f"constraint.{k}={v}" for k, v in cfg.constraint.items() if v is not None)
    constraint = constraint_maker(job["constraint"], tokenizer, origin)() if job["constraint"] else None  # compiled before the model loads
    model = _load(cfg, job["model_path"], record)
    initial = initial_state(cfg, model)
    penalties = make_penalties(cfg.sampling, model.spec.vocab_size)
    record.generating = True
    try:
        result = generate(
            model,
            tokenizer,
            cfg.prompt,
            token_count=cfg.token_count,
            sampler=job["sampler"],
            penalties=penalties,
            stop_tokens=job["stops"],
            chunk_len=cfg.sampling.chunk_len,
            state=initial,
            seed=cfg.seed,
            callbacks=[record.recorder, record.metrics, *job["callbacks"]],
            constraint=constraint,
        )
    except OSError as exc:  # a callback's file in the run directory (generation.jsonl)
        if exc.filename is None or Path(exc.filename).parent != record.out_dir:
            raise
        raise RunDirError(f"cannot write {exc.filename}: {exc.strerror or exc}") from None
    record.stop_reason = result.stop_reason


def _generate_batch(cfg: DictConfig, record: _BatchRecord) -> None:
    """Every prompt of the file through one engine; the first prompt's error (if any) is raised
    once all have ended, after each is recorded in results.jsonl."""
    _check_engine(cfg)
    record.lines = read_prompts(cfg.prompts_file, cfg)
    names = [n for n in cfg.callbacks.names if n not in _SINGLE_STREAM]
    try:
        factories = [registry.get("callbacks", n) for n in names]
    except PluginError as exc:
        raise PluginError(f"callbacks.names: {exc}") from None
    model_path = check_model(cfg)
    tokenizer = resolve_tokenizer(cfg.model.tokenizer)
    cuts = [line.cache_prefix_len(tokenizer, cfg.prompts_file) for line in record.lines]
    makers = constraint_makers(record.lines, tokenizer, cfg.prompts_file)  # compiled before the model loads
    model = _load(cfg, model_path, record)
    initial = initial_state(cfg, model)
    cache = PromptCache(cfg.engine.cache_mb << 20) if cfg.engine.cache_mb else None
    record.engine = engine = Engine(model, tokenizer, max_batch=cfg.engine.max_batch, prefill_tokens_per_step=cfg.engine.prefill_budget, cache=cache)
    progress = BatchProgress(len(record.lines))
    requests = [
        Request(
            line.prompt, line.token_count, line.sampler, line.penalties(model.spec.vocab_size), line.stops, line.sampling.chunk_len,
            state=initial, seed=line.seed, callbacks=[registry.get("callbacks", "metrics")(), progress, *(f() for f in factories)],
            cache_prefix_len=cut, constraint=make() if make else None,
        )
        for line, cut, make in zip(record.lines, cuts, makers)
    ]
    record.generating, record.started = True, time.perf_counter()
    try:
        record.handles = [engine.submit(r) for r in requests]
        engine.run()
    finally:
        progress.close()
    failed = next((h for h in record.handles if h.error is not None), None)
    if failed is not None:
        line = record.lines[record.handles.index(failed)]
        raise RwkvkitError(f"prompt {line.index} (line {line.line} of {cfg.prompts_file}): {_describe(failed.error)}") from failed.error


def _describe(exc: BaseException) -> str:
    """One line for run.json and the terminal; an unexpected error (a bug, often in a plugin) also
    names where it was raised."""
    if isinstance(exc, RwkvkitError):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    file = Path(frames[-1].filename) if frames else None
    where = f" (raised at {file.parent.name}/{file.name}:{frames[-1].lineno})" if file else ""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}{where}"


def run_job(cfg: DictConfig) -> dict[str, float]:
    """The Hydra task. Returns the metrics (a sweep's summary collects them from the run dirs).

    However the run ends, run.json says how. A failed job of a sweep is reported and recorded and
    the sweep goes on; a single run exits with code 2 (130/143 when stopped by Ctrl-C/SIGTERM).
    """
    hydra_cfg = HydraConfig.get()
    batch = cfg.prompts_file is not None
    record = (_BatchRecord if batch else _Record)(Path(hydra_cfg.runtime.output_dir), _planned_info(cfg))
    memory.reset_peak()  # this job's peak, not the sweep process's so far
    stop: BaseException | None = None
    try:
        _check_prompt_source(cfg)
        _take_prompt_file(cfg)
        record.info.update({"prompts_file": cfg.prompts_file} if batch else {"prompt": cfg.prompt})
        write_text(record.out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        _generate_batch(cfg, record) if batch else _generate(cfg, record)
    except (KeyboardInterrupt, Exception) as exc:  # recorded first, then reported
        stop = exc
        if not isinstance(exc, (KeyboardInterrupt, RwkvkitError)):
            log.error("unexpected error", exc_info=exc)
    try:
        metrics = record.write(*_outcome(stop))
    except RunDirError as exc:
        stop, metrics = stop or exc, {}  # the first failure is the one to report
    if stop is None:
        _summarize(record, metrics, hydra_cfg.mode == RunMode.RUN)
    else:
        _report(stop, record, hydra_cfg)  # exits, unless a job of a sweep failed
    return metrics


def _shown(path: Path) -> str:
    """A path for the terminal: relative when it is under the working directory."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _summarize(record: _Record, metrics: dict[str, float], on_terminal: bool) -> None:
    """The line that ends a completed run: what it made and where it went (run.log keeps it too)."""
    line = f"{record.summary(metrics)}; run directory {_shown(record.out_dir)}"
    log.info(line)
    if on_terminal:
        print(f"rwkvkit: {line}", file=sys.stderr)


def _outcome(stop: BaseException | None) -> tuple[str, str | None]:
    """run.json's status, and error if any, for the way the run ended."""
    if stop is None:
        return "completed", None
    if isinstance(stop, KeyboardInterrupt):
        return stop_of(stop)[0], None
    return "failed", _describe(stop)


def _report(stop: BaseException, record: _Record, hydra_cfg: DictConfig) -> None:
    """Exit for a stop or a single run's failure; a sweep job's failure is shown and the sweep goes on."""
    if isinstance(stop, KeyboardInterrupt):
        status, code = stop_of(stop)
        kept = f"; partial output kept in {record.out_dir / 'output.txt'}" if record.generating else ""
        print(f"\nrwkvkit: {status}{kept}", file=sys.stderr)
        sys.exit(code)
    error = _describe(stop) if isinstance(stop, RwkvkitError) else f"{_describe(stop)}; traceback in {_shown(record.out_dir / 'run.log')}"
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep summary lists this job as failed
        report(SweepError(f"job {hydra_cfg.job.num} ({' '.join(map(shown, hydra_cfg.overrides.task))}): {error}"))
        return
    fail(RwkvkitError(error))


def _planned_info(cfg: DictConfig) -> dict[str, Any]:
    """run.json's description of the run before the model loads (the checkpoint's hashes follow)."""
    return {
        "seed": cfg.seed,
        "model_path": cfg.model.path,
        "strategy": cfg.strategy.spec,
        "backend": cfg.strategy.backend,
        "rwkvkit_version": rwkvkit.__version__,
        "torch_version": torch.__version__,
    }
