"""``rwkvkit run``: one generation from a composed Hydra config, recorded in its run directory.

The run directory (Hydra's output dir) receives ``config.yaml`` (resolved), ``run.json`` (seed,
model path, sha256 and fingerprint, strategy, versions, status), ``output.txt`` and
``metrics.json``. Everything a user can get wrong is checked before the model loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import rwkvkit
from rwkvkit.checkpoint import SUFFIXES
from rwkvkit.config import make_penalties, make_sampler
from rwkvkit.errors import RwkvkitError
from rwkvkit.interfaces import Callback
from rwkvkit.native import cache_dir
from rwkvkit.plugins.callbacks import JsonlCallback, MetricsCallback
from rwkvkit.registry import registry
from rwkvkit.resolve import resolve_file, resolve_tokenizer

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


SHA256 = re.compile(r"[0-9a-f]{64}")


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
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, index)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return known[key]


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


def _origin(key: str, group: str) -> str:
    """Which config set ``key``: a command-line override or the chosen group option."""
    hc = HydraConfig.get()
    if any(o.split("=", 1)[0].lstrip("+~") == key for o in hc.overrides.task):
        return f"the command-line override {key}=..."
    return f"{key} in {group}={hc.runtime.choices.get(group)}"


def _read_prompt(cfg: DictConfig) -> str:
    if cfg.prompt_file is None:
        return cfg.prompt
    path = Path(cfg.prompt_file).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RwkvkitError(f"prompt_file={cfg.prompt_file}: cannot read it as UTF-8 text ({exc.__class__.__name__}: {exc})") from None


def _check_device(cfg: DictConfig) -> None:
    if "cuda" in cfg.strategy.spec and not torch.cuda.is_available():
        choice = HydraConfig.get().runtime.choices.get("strategy")
        raise RwkvkitError(f"strategy={choice} ('{cfg.strategy.spec}'): no CUDA device found; try strategy=cpu_fp32")


def _prepare(cfg: DictConfig) -> dict[str, Any]:
    """Everything that can fail on bad input, checked before loading the model."""
    sampler = make_sampler(cfg.sampling)
    make_penalties(cfg.sampling)  # range checks; ids are checked against the vocabulary later
    prompt = _read_prompt(cfg)
    model_path = resolve_file(cfg.model.path)
    if not model_path.is_file() and not any(model_path.with_name(model_path.name + s).is_file() for s in SUFFIXES):
        raise RwkvkitError(f"model file not found: {model_path} (set by {_origin('model.path', 'model')})")
    _check_device(cfg)
    return {"sampler": sampler, "prompt": prompt, "model_path": model_path}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_job(cfg: DictConfig) -> dict[str, float]:
    """The Hydra task. Returns the metrics (a sweep's summary collects them from the run dirs)."""
    from rwkvkit.compat import RWKV
    from rwkvkit.generation import generate

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    try:
        job = _prepare(cfg)
        if cfg.strategy.threads:
            torch.set_num_threads(cfg.strategy.threads)
        model = RWKV(job["model_path"], cfg.strategy.spec, backend=cfg.strategy.backend)
        tokenizer = resolve_tokenizer(cfg.model.tokenizer)
        penalties = make_penalties(cfg.sampling, model.spec.vocab_size)
        info = {
            "seed": cfg.seed,
            "model_path": str(model.checkpoint_path),
            "model_sha256": file_sha256(model.checkpoint_path),
            "model_fingerprint": model.fingerprint,
            "strategy": cfg.strategy.spec,
            "backend": cfg.strategy.backend,
            "rwkvkit_version": rwkvkit.__version__,
            "torch_version": torch.__version__,
        }
    except RwkvkitError as exc:
        print(f"rwkvkit: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)

    recorder, metrics = _Recorder(), MetricsCallback()
    callbacks: list[Callback] = [recorder, metrics]
    for name in cfg.callbacks.names:
        if name == "metrics":
            continue
        callbacks.append(JsonlCallback(out_dir / "generation.jsonl") if name == "jsonl" else registry.get("callbacks", name)())
    status = "completed"
    try:
        generate(
            model,
            tokenizer,
            job["prompt"],
            token_count=cfg.token_count,
            sampler=job["sampler"],
            penalties=penalties,
            stop_tokens=list(cfg.sampling.token_stop),
            chunk_len=cfg.sampling.chunk_len,
            seed=cfg.seed,
            callbacks=callbacks,
        )
    except KeyboardInterrupt:
        status = "interrupted"
    except RwkvkitError as exc:
        print(f"rwkvkit: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    finally:
        (out_dir / "output.txt").write_text("".join(recorder.pieces), encoding="utf-8")
    result_metrics = {**metrics.metrics, "generated_tokens": len(recorder.tokens), "peak_memory_mb": _peak_memory_mb()}
    _write_json(out_dir / "metrics.json", result_metrics)
    _write_json(out_dir / "run.json", {**info, "status": status, "tokens": recorder.tokens})
    if status == "interrupted":
        print(f"\nrwkvkit: interrupted; partial output kept in {out_dir / 'output.txt'}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    return result_metrics
