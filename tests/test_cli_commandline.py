"""The ``rwkvkit`` command line as people type it (issue 14): any prompt text and strategy string
without Hydra quoting, ``--prompt`` and piped prompts, one-line errors, a closing line naming the
run directory, what the run directory records, completion, ``--help``, ``python -m rwkvkit`` and
model names wherever a model path goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvkit.argv import hydra_overrides, literal, quote_free_text
from rwkvkit.paths import resolve_file

PROMPTS = ["Hello, world!", "it's", "naïve café", 'He said "no"', "a=b", "[1] item", "line one\nline two", "${oops} \\${x} (a)->b * c, 'd'\\"]


def run(*args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``rwkvkit ARGS`` as a user's shell would start it (argv as given, no shell quoting)."""
    return subprocess.run(
        [sys.executable, "-m", "rwkvkit", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
        input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, env={**os.environ, **(env or {})},
    )


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_any_prompt_text_works_as_typed(tmp_path, prompt):
    proc = run("run", f"prompt={prompt}", "token_count=1", "callbacks=quiet", "hydra.run.dir=r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert run_json(tmp_path / "r")["prompt"] == prompt


@pytest.mark.parametrize("text", PROMPTS + ["", "'", "\\", "a\\'b", "x\\"])
def test_literal_values_read_back_exactly(text):
    """Hydra's parser and OmegaConf give back exactly the text (the fast check of the quoting rule)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    value = OverridesParser.create().parse_override(f"prompt={literal(text)}").value()
    assert OmegaConf.create({"prompt": value}).prompt == text


def test_the_quoting_rule():
    assert quote_free_text("strategy.spec=cuda fp16 *12 -> cpu fp32", sweep=False) == "strategy.spec='cuda fp16 *12 -> cpu fp32'"
    assert quote_free_text("prompt='Hello, world!'", sweep=False) == "prompt='Hello, world!'"  # already Hydra-quoted: as before
    assert quote_free_text("prompt='it's'", sweep=False) == "prompt='\\'it\\'s\\''"  # not valid Hydra quoting: literal
    assert quote_free_text("strategy.spec=cpu fp32, cpu bf16", sweep=True) == "strategy.spec='cpu fp32','cpu bf16'"
    assert quote_free_text("+prompt=a,b", sweep=False) == "+prompt='a,b'"
    assert quote_free_text("sampling.top_p=0.5,0.9", sweep=True) == "sampling.top_p=0.5,0.9"  # other keys: Hydra's grammar


def test_strategy_string_from_the_readme_composes(tmp_path):
    proc = run("run", "strategy.spec=cuda fp16 *12 -> cpu fp32", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "spec: cuda fp16 *12 -> cpu fp32" in proc.stdout


def test_strategy_string_runs(tmp_path):
    proc = run("run", "strategy.spec=cpu fp32i8 *2 -> cpu fp32", "token_count=2", "callbacks=quiet", "hydra.run.dir=r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = run_json(tmp_path / "r")
    assert info["strategy"] == "cpu fp32i8 *2 -> cpu fp32" and info["backend"] == "int8, cpu"  # the backends that ran


def test_sweep_over_strategy_strings(tmp_path):
    proc = run("run", "-m", "strategy.spec=cpu fp32,cpu bf16", "token_count=1", "callbacks=quiet", "hydra.sweep.dir=s", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert [r["overrides"] for r in rows] == ["strategy.spec=cpu fp32", "strategy.spec=cpu bf16"]


def test_prompt_option_and_piped_prompt(tmp_path):
    proc = run("run", "--prompt", "Hello, world!", "token_count=1", "hydra.run.dir=a", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert run_json(tmp_path / "a")["prompt"] == "Hello, world!"
    proc = run("run", "token_count=1", "hydra.run.dir=b", cwd=tmp_path, stdin="And God said,\n")
    assert proc.returncode == 0, proc.stderr
    assert run_json(tmp_path / "b")["prompt"] == "And God said,\n"


def test_stdin_is_read_only_when_piped_and_no_prompt_given(tmp_path):
    assert hydra_overrides(["prompt=x"], stdin=_pipe("ignored")) == ["prompt='x'"]
    assert hydra_overrides(["seed=1"], stdin=_pipe("")) == ["seed=1"]
    with open(os.devnull) as devnull:  # a device, as in cron jobs or `< /dev/null`: not read
        assert hydra_overrides(["seed=1"], stdin=devnull) == ["seed=1"]
    assert hydra_overrides(["seed=1"], stdin=_pipe("piped")) == ["seed=1", "prompt='piped'"]


def _pipe(text: str):
    read, write = os.pipe()
    os.write(write, text.encode())
    os.close(write)
    return os.fdopen(read)


def test_a_run_ends_with_its_directory_and_a_summary(tmp_path):
    (tmp_path / "story.txt").write_text("In the beginning", encoding="utf-8")
    proc = run("run", "prompt_file=story.txt", "token_count=3", "callbacks=quiet", "hydra.run.dir=out/r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("rwkvkit: 3 tokens, ") and line.endswith(" tok/s, stop: length; run directory out/r"), line
    out = tmp_path / "out" / "r"
    assert sorted(p.name for p in out.iterdir()) == [".hydra", "config.yaml", "metrics.json", "output.txt", "run.json", "run.log"]
    info = run_json(out)
    assert info["prompt"] == "In the beginning" and info["stop_reason"] == "length" and info["backend"] == "cpu"
    assert "prompt: In the beginning" in (out / "config.yaml").read_text()  # the prompt used, not the default
    assert line.removeprefix("rwkvkit: ") in (out / "run.log").read_text()


def _fake_plugin(root: Path) -> dict[str, str]:
    """An installed plugin whose sampler has a bug (found through its dist-info on PYTHONPATH)."""
    (root / "broken_plugin.py").write_text(
        "from rwkvkit.hookspecs import hookimpl\nfrom rwkvkit.interfaces import Sampler\n\n"
        "class Broken(Sampler):\n    name = 'broken'\n    def sample(self, logits, ctx):\n        return {}['boom']\n\n"
        "@hookimpl\ndef register_samplers(register):\n    register(Broken)\n"
    )
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rwkvkit]\nbroken = broken_plugin\n")
    return {"PYTHONPATH": str(root)}


def test_a_bug_in_a_plugin_is_one_line_and_its_traceback_goes_to_run_log(tmp_path):
    proc = run("run", "sampling.name=broken", "token_count=2", "hydra.run.dir=r", cwd=tmp_path, env=_fake_plugin(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["rwkvkit: error: KeyError: 'boom' (raised at " f"{tmp_path.name}/broken_plugin.py:7); traceback in r/run.log"]
    assert "Traceback (most recent call last)" in (tmp_path / "r" / "run.log").read_text()
    assert run_json(tmp_path / "r")["status"] == "failed"


def test_help_documents_every_key(tmp_path):
    proc = run("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "run_schema" not in proc.stdout  # the ConfigStore node is no group option (constraint.json_schema is a key)
    assert "sampling: creative, default, greedy, min_p, precise" in proc.stdout
    for row in (
        "sampling.top_p            float           0.85                    nucleus cutoff in [0, 1]",
        "strategy.threads          int or null     null",
        "token_count               int             200                     tokens to generate at most",
    ):
        assert row in proc.stdout
    assert 'prompt="Hello, world!"' in proc.stdout  # the quoting rule


def test_completion_installs_for_rwkvkit_and_completes_run(tmp_path):
    proc = run("run", "-sc", "install=bash", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("-F hydra_bash_completion rwkvkit")
    query = {"COMP_LINE": "rwkvkit run strategy=cpu_f", "COMP_POINT": "26"}
    proc = run("-sc", "query=bash", cwd=tmp_path, env=query)
    assert proc.returncode == 0 and proc.stdout.split() == ["strategy=cpu_fp32", "strategy=cpu_fp32i8"]
    proc = run("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "rwkvkit pl"})
    assert proc.stdout.split() == ["plugins"]


def test_completion_in_bash(tmp_path):
    script = run("run", "-sc", "install=bash", cwd=tmp_path).stdout
    bindir = Path(sys.executable).parent  # where the rwkvkit console script is
    probe = 'COMP_LINE="rwkvkit run sampling=cr"; COMP_POINT=${#COMP_LINE}; COMP_CWORD=2; hydra_bash_completion; echo "${COMPREPLY[@]}"'
    proc = subprocess.run(["bash", "-c", f"{script}\n{probe}"], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, timeout=120)
    assert proc.stdout.split() == ["sampling=creative"], proc.stderr


def test_python_dash_m_rwkvkit(tmp_path):
    proc = run("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("rwkvkit ")


@pytest.mark.parametrize("name", ["demo", "pkg://rwkvkit.demo/demo.pth", "pkg://rwkvkit.demo/demo"])
def test_info_takes_config_names_and_package_paths(tmp_path, name):
    proc = run("info", name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{resolve_file('pkg://rwkvkit.demo/demo.pth')}: RWKV-7, 4.5M parameters")


def test_a_template_config_name_resolves_its_path(tmp_path):
    proc = run("info", "world_0.1b", cwd=tmp_path, env={"RWKV_MODELS": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"rwkvkit: error: checkpoint not found: world_0.1b (tried {tmp_path}/RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth,")


def test_rwkv_takes_config_names_and_package_paths():
    from rwkvkit import RWKV

    assert RWKV("demo").checkpoint_path == RWKV("pkg://rwkvkit.demo/demo.pth").checkpoint_path


def test_a_reader_that_stops_early_ends_it_quietly(tmp_path):
    """``| true`` has closed the pipe before rwkvkit prints (importing takes far longer)."""
    pipeline = f"{sys.executable} -m rwkvkit info demo | true; echo ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.stderr == "" and proc.stdout.strip() == "141"  # 128 + SIGPIPE, as for any program stopped by a pipe
