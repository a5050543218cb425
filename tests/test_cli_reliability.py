"""``rwkvkit run`` never overwrites a user's files, survives SIGTERM/Ctrl-C at any point, records
failed sweep jobs, shrugs off a damaged hash cache, and reports every bad input as one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkvkit.errors import RunDirError
from rwkvkit.run import file_sha256
from rwkvkit.rundir import claim, read_json, write_text
from test_cli_run import rwkvkit_run, world_args  # noqa: F401  (world_args is a fixture)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single line a failed ``rwkvkit run`` prints on stderr (exit code 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- run directories -------------------------------------------------------------------------


def test_a_directory_holding_user_files_is_refused_and_left_alone(tmp_path, world_args):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "output.txt").write_text("my novel")
    (out / "config.yaml").write_text("my: config\n")
    proc = rwkvkit_run(*world_args, "token_count=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert one_error_line(proc) == (
        f"rwkvkit: error: hydra.run.dir={out} already holds files (config.yaml, output.txt); "
        "rwkvkit never writes over them: choose a new or empty directory"
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "output.txt"]  # not even .hydra/ or run.log
    assert (out / "output.txt").read_text() == "my novel" and (out / "config.yaml").read_text() == "my: config\n"


def test_a_second_run_into_a_run_directory_is_refused(tmp_path, world_args):
    out = tmp_path / "r"
    assert rwkvkit_run(*world_args, "token_count=2", "callbacks=quiet", f"hydra.run.dir={out}", cwd=tmp_path).returncode == 0
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = rwkvkit_run(*world_args, "token_count=3", "seed=9", f"hydra.run.dir={out}", cwd=tmp_path)
    assert one_error_line(proc).startswith(f"rwkvkit: error: hydra.run.dir={out} already holds files (.hydra, config.yaml, metrics.json, ")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first


def test_a_sweep_directory_holding_files_is_refused(tmp_path, world_args):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "notes.txt").write_text("keep me")
    proc = rwkvkit_run("-m", *world_args, "token_count=2", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert one_error_line(proc) == (
        f"rwkvkit: error: hydra.sweep.dir={sweep} already holds files (notes.txt); "
        "rwkvkit never writes over them: choose a new or empty directory"
    )
    assert [p.name for p in sweep.iterdir()] == ["notes.txt"]


def test_a_run_directory_through_a_file(tmp_path, world_args):
    (tmp_path / "afile").write_text("")
    proc = rwkvkit_run(*world_args, f"hydra.run.dir={tmp_path / 'afile' / 'sub'}", cwd=tmp_path)
    assert one_error_line(proc) == f"rwkvkit: error: hydra.run.dir={tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a directory"


def test_a_run_directory_that_cannot_be_created(tmp_path, world_args):
    proc = rwkvkit_run(*world_args, "hydra.run.dir=/sys/rwkvkit-test-run", cwd=tmp_path)  # sysfs: no mkdir, even for root
    assert one_error_line(proc).startswith("rwkvkit: error: hydra.run.dir=/sys/rwkvkit-test-run: cannot create the directory (")


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_an_unwritable_empty_directory(tmp_path):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    with pytest.raises(RunDirError, match=rf"^hydra.run.dir={out}: the directory is not writable$"):
        claim(str(out), "hydra.run.dir")


def test_run_directory_writes_name_the_file(tmp_path):
    with pytest.raises(RunDirError, match=rf"^cannot write {tmp_path}/gone/run.json: No such file or directory$"):
        write_text(tmp_path / "gone" / "run.json", "{}")


def test_damaged_run_files_read_as_empty(tmp_path):
    (tmp_path / "run.json").write_text('{"status": "comp')
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(tmp_path / "run.json") == read_json(tmp_path / "list.json") == read_json(tmp_path / "missing.json") == {}


# --- one-line errors for bad options; a failed run says so in run.json -------------------------


@pytest.mark.parametrize(
    "arg, message",
    [
        ("callbacks.names=[stdout,nope]", "callbacks.names: unknown callback 'nope'; available: jsonl, metrics, progress, stdout"),
        ("strategy.threads=-1", "strategy.threads=-1: expected a positive integer, or null for torch's default"),
        ("strategy.threads=0", "strategy.threads=0: expected a positive integer, or null for torch's default"),
    ],
)
def test_bad_option_is_one_line_and_recorded(tmp_path, world_args, arg, message):
    out = tmp_path / "r"
    proc = rwkvkit_run(*world_args, arg, f"hydra.run.dir={out}", cwd=tmp_path)
    assert one_error_line(proc) == f"rwkvkit: error: {message}"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == message
    assert not (out / "output.txt").exists()  # no empty "output" of a run that never generated


# --- sweeps: a failing job is recorded and the sweep goes on -----------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA, where cuda_fp16 fails")
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"])
def test_a_failing_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path, world_args, launcher):
    if launcher:
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    sweep = tmp_path / "sweep"
    proc = rwkvkit_run("-m", *launcher, *world_args, "callbacks=quiet", "token_count=3", "strategy=cuda_fp16,cpu_fp32", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    cuda_error = "strategy=cuda_fp16 ('cuda fp16'): no CUDA device found; try strategy=cpu_fp32"
    assert proc.stderr.strip().splitlines() == [
        f"rwkvkit: error: job 0 ({' '.join(world_args)} callbacks=quiet token_count=3 strategy=cuda_fp16): {cuda_error}",
        f"rwkvkit: error: 1 of 2 jobs did not complete (job 0); see {sweep / 'summary.csv'}",
    ]
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(r["overrides"], r["status"], r["error"]) for r in rows] == [("strategy=cuda_fp16", "failed", cuda_error), ("strategy=cpu_fp32", "completed", "")]
    assert rows[1]["generated_tokens"] == 3 and json.loads((sweep / "0" / "run.json").read_text())["error"] == cuda_error
    assert "strategy=cuda_fp16,failed," in (sweep / "summary.csv").read_text()


# --- SIGTERM and Ctrl-C ------------------------------------------------------------------------


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rwkvkit.cli", "run", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)


def wait_for(predicate, proc: subprocess.Popen, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, "rwkvkit run ended or stalled before the signal"
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=60)[1]
    finally:
        proc.kill()


@pytest.mark.parametrize("sig, status, code", [(signal.SIGTERM, "terminated", 143), (signal.SIGINT, "interrupted", 130)])
def test_a_signal_during_generation_keeps_everything(tmp_path, world_args, sig, status, code):
    out = tmp_path / "r"
    proc = start(*world_args, "callbacks=record", "token_count=100000", f"hydra.run.dir={out}", cwd=tmp_path)
    jsonl = out / "generation.jsonl"
    wait_for(lambda: jsonl.is_file() and jsonl.read_text().count('"event": "token"') >= 20, proc)
    proc.send_signal(sig)
    stderr = finish(proc)
    assert proc.returncode == code, stderr
    assert stderr.strip() == f"rwkvkit: {status}; partial output kept in {out / 'output.txt'}"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == status and len(run["tokens"]) >= 20
    assert json.loads((out / "metrics.json").read_text())["generated_tokens"] == len(run["tokens"])
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]  # every line whole
    assert records[-1]["event"] == "end" and records[-1]["stop_reason"] == status and records[-1]["tokens"] == run["tokens"]
    assert (out / "output.txt").read_text() == records[-1]["text"]


@pytest.mark.parametrize("sig, status, code", [(signal.SIGTERM, "terminated", 143), (signal.SIGINT, "interrupted", 130)])
def test_a_signal_while_torch_imports_is_one_line(tmp_path, world_args, sig, status, code):
    """Signals landing inside `import torch`/numpy (C extensions a KeyboardInterrupt leaves half
    initialised: a later AttributeError, an abort from C++ or a death by the signal, each seen
    before the signals were held during start-up's imports) at several moments of it."""
    for i, delay in enumerate((0.2, 0.4, 0.6, 0.8, 1.0)):
        proc = start(*world_args, "token_count=100000", f"hydra.run.dir={tmp_path / str(i)}", cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(sig)
        stderr = finish(proc)
        assert proc.returncode == code, (delay, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.strip().startswith(f"rwkvkit: {status}"), (delay, stderr)


@pytest.mark.parametrize("sig, status, code", [(signal.SIGTERM, "terminated", 143), (signal.SIGINT, "interrupted", 130)])
def test_a_signal_during_start_up_is_one_line(tmp_path, world_args, sig, status, code):
    proc = start(*world_args, "token_count=100000", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    time.sleep(1.0)  # importing torch and Hydra, composing the config or loading the model by now
    proc.send_signal(sig)
    stderr = finish(proc)
    assert proc.returncode == code, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.strip().startswith(f"rwkvkit: {status}"), stderr


# --- the checkpoint hash cache is only a cache -------------------------------------------------


@pytest.mark.parametrize("damage", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"key": 7}'])
def test_a_damaged_hash_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, model_paths, damage):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path))
    (tmp_path / "sha256.json").write_bytes(damage)
    path = model_paths["tiny"]
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == expected
    assert list(json.loads((tmp_path / "sha256.json").read_text()).values()) == [expected]


def test_an_unwritable_hash_cache_is_skipped(tmp_path, monkeypatch, model_paths):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "afile" / "cache"))  # cannot be created
    path = model_paths["tiny"]
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_interrupt_inside_a_token_leaves_the_run_record_equal_to_the_end_record():
    """A signal between the engine recording a token and the run's recorder hearing of it (here:
    inside the penalties' update of the 6th token) must not leave run.json's tokens and text
    one token behind what every callback's on_end reports (generation.jsonl's end record)."""
    from rwkvkit import RWKV
    from rwkvkit.generation import generate
    from rwkvkit.interfaces import Callback
    from rwkvkit.penalties import Penalties
    from rwkvkit.plugins.samplers import GreedySampler
    from rwkvkit.resolve import resolve_tokenizer
    from rwkvkit.run import _Recorder

    class Interrupting(Penalties):
        updates = 0

        def update(self, token, text):
            super().update(token, text)
            self.updates += 1
            if self.updates == 6:
                raise KeyboardInterrupt

    class End(Callback):
        def on_end(self, result):
            self.result = result

    recorder, end = _Recorder(), End()
    model, tokenizer = RWKV("demo", "cpu fp32"), resolve_tokenizer("pkg://rwkvkit.demo/tokenizer.json")
    with pytest.raises(KeyboardInterrupt):
        generate(model, tokenizer, "\nIn the beginning", token_count=50, sampler=GreedySampler(), penalties=Interrupting(), callbacks=[recorder, end])
    assert end.result.stop_reason == "interrupted" and len(end.result.tokens) == 6
    assert (recorder.tokens, "".join(recorder.pieces)) == (end.result.tokens, end.result.text)
