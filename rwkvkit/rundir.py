"""Run directories of ``rwkvkit run``: a run never writes into a directory that holds other files,
and a failed write is an error naming the file.

Hydra writes ``.hydra/`` and the job log into the run directory before the task starts, so the
directory is checked earlier, by a Hydra callback at the start of the run (or of the sweep, whose
jobs go into numbered sub-directories of a sweep directory checked the same way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rwkvkit.errors import RunDirError, fail

SHOWN = 5  # names listed when refusing a directory


def claim(directory: str, key: str) -> Path:
    """Create ``directory`` (set by the option ``key``) for a new run; refuse one that already
    holds anything, since the run's files would overwrite or be mixed with it."""
    path = Path(directory)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunDirError(f"{key}={directory}: {blocker} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        found = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise RunDirError(f"{key}={directory}: cannot create the directory ({exc.strerror or exc})") from None
    if found:
        names = ", ".join(found[:SHOWN]) + (", ..." if len(found) > SHOWN else "")
        raise RunDirError(f"{key}={directory} already holds files ({names}); rwkvkit never writes over them: choose a new or empty directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"{key}={directory}: the directory is not writable")
    return path


class RunDirGuard(Callback):
    """Claims the run (or sweep) directory before Hydra writes into it. Hydra turns a callback's
    exceptions into warnings, so a refusal exits here (one line, code 2)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(config, "hydra.sweep.dir")

    @staticmethod
    def _claim(config: DictConfig, key: str) -> None:
        from rwkvkit.argv import hydra_error

        try:
            claim(OmegaConf.select(config, key, throw_on_missing=True), key)
        except RunDirError as exc:
            fail(exc)
        except OmegaConfBaseException as exc:  # e.g. an interpolation that does not resolve
            fail(RunDirError(f"{key}: {hydra_error(exc)}"))


def write_text(path: Path, text: str) -> None:
    """Write a run-directory file; an OSError (disk full, permissions) becomes a RunDirError."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A run-directory JSON file, or {} when it is missing or damaged (a run killed mid-write)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
