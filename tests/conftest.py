"""Shared fixtures: small random RWKV-7 checkpoints and the reference oracle run in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from rwkvkit.testing import make_checkpoint

def pytest_configure(config: pytest.Config) -> None:
    """Every test, and every process a test starts, builds kernels and caches into a temporary
    folder: the suite never writes to the user's ``~/.cache/rwkvkit``."""
    config._rwkvkit_cache = os.environ["RWKVKIT_CACHE"] = tempfile.mkdtemp(prefix="rwkvkit-test-cache-")
    # A shell without job control starts a background job (`pytest ... &`, nohup) with Ctrl-C
    # ignored, and every child inherits that: the Ctrl-C tests' `rwkvkit run` would ignore the
    # SIGINT they send, as it should, and never stop. Children of a handled SIGINT start with the default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(getattr(config, "_rwkvkit_cache", ""), ignore_errors=True)


ORACLE_RUNNER = Path(__file__).with_name("oracle_runner.py")
API_DEMO = [187, 510, 1563, 310, 247]

# name -> (n_layer, n_embd, vocab_size, seed)
MODEL_SHAPES = {
    "tiny": (2, 128, 2048, 1),
    "world": (3, 256, 65536, 2),  # the real World vocabulary size
}


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_checkpoint(root / f"{name}.pth", L, C, V, seed=seed) for name, (L, C, V, seed) in MODEL_SHAPES.items()}


def run_oracle(model_path: Path, strategy: str, workdir: Path, **job: dict) -> dict[str, dict]:
    """Run the `rwkv` pip package on a job (``runs=``/``generations=``, see oracle_runner.py)."""
    path, out = workdir / f"job-{model_path.stem}-{strategy.replace(' ', '_')}.pt", workdir / "out.pt"
    torch.save({"model": str(model_path.with_suffix("")), "strategy": strategy, **job}, path)
    proc = subprocess.run([sys.executable, str(ORACLE_RUNNER), str(path), str(out)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"oracle failed:\n{proc.stderr[-3000:]}")
    return torch.load(out)
