"""``rwkvkit run``: config composition, end-to-end runs, sweeps, and every bad input's message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from rwkvkit.config import make_sampler, register_configs

GROUPS = ("model", "strategy", "sampling", "callbacks")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in resources.files("rwkvkit.conf").joinpath(group).iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    register_configs()
    with initialize_config_module(config_module="rwkvkit.conf", version_base=None):
        cfg = compose("run", overrides=[f"{group}={option}"])
    assert cfg.token_count == 200 and cfg.seed == 42
    if group == "sampling":
        make_sampler(cfg.sampling)  # every preset passes the range checks
    if group == "strategy":
        assert cfg.strategy.spec and cfg.strategy.backend in ("auto", "torch")


def rwkvkit_run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rwkvkit.cli", "run", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def world_args(model_paths):
    return [f"model.path={model_paths['world']}", "model.tokenizer=rwkv_vocab_v20230424"]


def test_end_to_end_run_writes_the_run_directory(tmp_path, world_args, model_paths):
    out = tmp_path / "run1"
    proc = rwkvkit_run(*world_args, "sampling=creative", "token_count=12", "seed=7", "prompt=Once upon a time", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (out / "output.txt").read_text()
    assert text and text in proc.stdout  # streamed to the terminal
    run = json.loads((out / "run.json").read_text())
    import hashlib

    assert run["model_sha256"] == hashlib.sha256(model_paths["world"].read_bytes()).hexdigest()
    assert run["seed"] == 7 and run["status"] == "completed" and len(run["tokens"]) == 12
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generated_tokens"] == 12 and metrics["decode_tok_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    config = (out / "config.yaml").read_text()
    assert "temperature: 1.2" in config and "seed: 7" in config  # resolved, with the overrides
    again = rwkvkit_run(*world_args, "sampling=creative", "token_count=12", "seed=7", "prompt=Once upon a time", f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "run2" / "output.txt").read_text() == text  # same config + seed -> same text


def test_sweep_2x2_writes_a_summary(tmp_path, world_args):
    sweep = tmp_path / "sweep"
    proc = rwkvkit_run("-m", *world_args, "callbacks=quiet", "token_count=5", "sampling.temperature=0.5,1.0", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and d.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    for job in jobs:
        assert json.loads((sweep / job / "run.json").read_text())["status"] == "completed"
        assert (sweep / job / "output.txt").read_text()
    rows = json.loads((sweep / "summary.json").read_text())
    assert {r["overrides"] for r in rows} == {f"sampling.temperature={t} seed={s}" for t in ("0.5", "1.0") for s in (1, 2)}
    assert (sweep / "summary.csv").read_text().startswith("job,overrides,status")
    assert "sweep summary" in proc.stdout and "decode_tok_per_s" in proc.stdout


def test_user_config_dir_adds_models(tmp_path, model_paths):
    user = tmp_path / "my_models" / "model"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text(f"path: {model_paths['world']}\ntokenizer: rwkv_vocab_v20230424\n")
    proc = rwkvkit_run("--config-dir", str(tmp_path / "my_models"), "model=mine", "token_count=3", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_help_lists_the_groups(tmp_path):
    proc = rwkvkit_run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for name in ("model:", "strategy:", "sampling:", "cpu_fp32", "world_0.1b", "creative"):
        assert name in proc.stdout


@pytest.mark.parametrize(
    "args, line",
    [
        (["strategy=nope"], "In 'run': Could not find 'strategy/nope'; available: cpu_bf16, cpu_fp32, cpu_fp32i8, cuda_bf16, "),
        (["token_count=abc"], "Error merging override token_count=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (["sampling.top_p=abc"], "Error merging override sampling.top_p=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["sampling.nope=1"], "Could not override 'sampling.nope': Key 'nope' not in 'SamplingConfig'"),
        (["seed=[1"], "cannot parse override 'seed=[1': no viable alternative at input '[1'"),
        (["--bogus"], "unrecognized arguments: --bogus (rwkvkit run --help)"),
        (["Once upon a time"], "'Once upon a time': expected key=value or group=option; a prompt is given as prompt=\"...\" or --prompt \"...\""),
        (["--prompt"], "--prompt: expected the prompt text after it"),
        (["hydra.run.dir=${nope}"], "hydra.run.dir: Interpolation key 'nope' not found"),
    ],
)
def test_hydra_errors_are_one_line(tmp_path, args, line):
    proc = rwkvkit_run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"rwkvkit: error: {line}")
    assert "_schema" not in proc.stderr  # config schemas are not options


@pytest.mark.parametrize(
    "args, message",
    [
        (["sampling.top_p=2"], "sampling: sampling option top_p=2.0: expected a number in [0.0, 1.0]"),
        (["sampling.temperature=-1"], "sampling option temperature=-1.0"),
        (["sampling.name=nope"], "unknown sampler 'nope'; available: greedy, min_p, nucleus, typical"),
        (["model.path=/nonexistent/model.pth"], "model file not found: /nonexistent/model.pth (set by the command-line override model.path=...)"),
        (["prompt_file=/nonexistent/prompt.txt"], "prompt_file=/nonexistent/prompt.txt: cannot read it as UTF-8 text"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, world_args, args, message):
    proc = rwkvkit_run(*world_args, *args, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_file_of_a_model_template_names_the_template(tmp_path):
    env_models = tmp_path / "models"
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvkit.cli", "run", "model=world_0.1b", f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "RWKV_MODELS": str(env_models)},
    )
    assert proc.returncode == 2
    assert f"model file not found: {env_models}/RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth (set by model.path in model=world_0.1b)" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without CUDA")
def test_cuda_strategy_without_cuda(tmp_path, world_args):
    proc = rwkvkit_run(*world_args, "strategy=cuda_fp16", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "strategy=cuda_fp16 ('cuda fp16'): no CUDA device found; try strategy=cpu_fp32" in proc.stderr


def test_prompt_file(tmp_path, world_args):
    (tmp_path / "prompt.txt").write_text("The prompt from a file\n", encoding="utf-8")
    proc = rwkvkit_run(*world_args, f"prompt_file={tmp_path / 'prompt.txt'}", "token_count=2", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_ctrl_c_keeps_partial_output(tmp_path, world_args):
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rwkvkit.cli", "run", *world_args, "token_count=100000", f"hydra.run.dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    streamed: list[str] = []
    reader = threading.Thread(target=lambda: streamed.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and len(streamed) < 40:  # generating by now
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == 130, stderr
    partial = (out / "output.txt").read_text()
    assert len(partial) >= 40 and partial in "".join(streamed)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert "partial output kept" in stderr


def test_joblib_launcher_sweep(tmp_path, world_args):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher (the rwkvkit[sweep] extra) is not installed")
    sweep = tmp_path / "sweep"
    proc = rwkvkit_run("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *world_args, "callbacks=quiet", "token_count=4", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "completed"] and [r["overrides"] for r in rows] == ["seed=1", "seed=2"]


def test_bad_token_stop_fails_before_the_model_loads(tmp_path):
    """``token_stop`` is List[Any] (ids and stop strings), so composition lets 1.5 through: the run
    checks it before loading (the model path here does not exist, so reaching the load would say so)."""
    proc = rwkvkit_run("model.path=/nonexistent/model.pth", "sampling.token_stop=[1.5]", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "rwkvkit: error: sampling.token_stop has [1.5]: expected token ids (integers) or non-empty stop strings"


def test_stop_string_and_long_prompt_progress(tmp_path, world_args):
    """A stop string ends the run (stop reason recorded); a prompt read in several chunks shows a
    prefill bar on stderr even with callbacks=quiet."""
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 300)
    out = tmp_path / "r"
    proc = rwkvkit_run(
        *world_args, f"prompt_file={prompt}", "sampling.chunk_len=64", "sampling=greedy", "token_count=2", "callbacks=quiet", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "prefill" in proc.stderr
    first = (out / "output.txt").read_text()
    assert first, "greedy decoding of the random model produced no text to stop on"
    out2 = tmp_path / "r2"
    stop = json.dumps([first[0]])
    proc = rwkvkit_run(*world_args, f"prompt_file={prompt}", "sampling=greedy", "token_count=2", f"sampling.token_stop={stop}", "callbacks=quiet", f"hydra.run.dir={out2}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out2 / "run.json").read_text())
    assert run["stop_reason"] == "stop_string" and (out2 / "output.txt").read_text() == ""
