"""Every command in the README's ``bash`` blocks runs as written (in a fresh folder, through bash),
except those that need a GPU, a downloaded model, a package index or are the test suite itself.
``rwkvkit run`` commands get ``token_count=8`` appended (the last value wins), to stay quick."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMENT = re.compile(r"\s+#\s.*$")
SKIPS = [  # (pattern, why): the only commands not run here
    (re.compile(r"cuda|gpu"), "needs a GPU"),
    (re.compile(r"world_\d|/models/|/data/|my_models"), "needs a downloaded model"),
    (re.compile(r"^(pip install|python3 -m venv)"), "installs packages from an index (the install tests cover it)"),
    (re.compile(r"^pytest"), "the test suite itself"),
]


def commands() -> list[str]:
    """The README's bash commands, continuation lines joined, trailing comments removed."""
    out = []
    for block in BLOCK.findall(README.read_text(encoding="utf-8")):
        for command in block.replace("\\\n", " ").splitlines():
            command = COMMENT.sub("", command).strip()
            if command:
                out.append(command)
    return out


def skip_reason(command: str) -> str | None:
    if "hydra/launcher=joblib" in command and importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
        return "needs the sweep extra (hydra-joblib-launcher)"
    return next((why for pattern, why in SKIPS if pattern.search(command)), None)


def test_the_readme_has_commands_to_run():
    runnable = [c for c in commands() if skip_reason(c) is None]
    assert any(c.startswith("rwkvkit run -m") for c in runnable) and any('strategy.spec="cpu' in c for c in runnable)


@pytest.mark.parametrize("command", commands())
def test_readme_command(command, tmp_path):
    reason = skip_reason(command)
    if reason is not None:
        pytest.skip(reason)
    (tmp_path / "story.txt").write_text("In the beginning God created the heaven and the earth.\n", encoding="utf-8")
    if "rwkvkit run" in command:
        command += " token_count=8"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stderr}"
    if "rwkvkit run" in command and " -m " not in command:
        assert re.search(r"^rwkvkit: 8 tokens, .* tok/s, stop: length; run directory outputs/", proc.stderr, re.MULTILINE), proc.stderr
