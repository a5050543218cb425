"""The ``rwkvkit`` console script."""

from __future__ import annotations

import subprocess

from rwkvkit.cli import main


def test_info_describes_a_checkpoint(model_paths, capsys):
    assert main(["info", str(model_paths["tiny"].with_suffix(""))]) == 0
    out = capsys.readouterr().out
    assert "RWKV-7" in out and "n_layer    2" in out and "vocab_size 2048" in out


def test_info_on_a_missing_file_is_one_clear_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rwkvkit: error: checkpoint not found") and "Traceback" not in err


def test_console_script_is_installed():
    proc = subprocess.run(["rwkvkit", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("rwkvkit ")
