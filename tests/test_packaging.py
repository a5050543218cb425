"""A real (non-editable) wheel install works: code, plugins, configs and kernel sources are found
through importlib.resources, not through paths into the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"plugins": "rwkvkit.plugins", "conf": "rwkvkit.conf", "kernels": "rwkvkit.kernels", "rwkvkit/demo": "rwkvkit.demo"}
CHECK = r"""
import sys, importlib.resources as res
import rwkvkit, rwkvkit.plugins
from rwkvkit import RWKV
assert rwkvkit.__file__.startswith(sys.prefix), f"imported from {rwkvkit.__file__}, not the fresh venv"
for package, name in (line.split(":") for line in sys.argv[2:]):
    assert res.files(package).joinpath(name).is_file(), f"{package}/{name} missing from the wheel"
out, state = RWKV(sys.argv[1], "cpu fp32").forward([1, 2, 3], None)
print("ok", tuple(out.shape))
"""
RUN_CHECK = r"""
import subprocess, sys
proc = subprocess.run([sys.executable, "-m", "rwkvkit.cli", "run", f"model.path={sys.argv[1]}", "model.tokenizer=rwkv_vocab_v20230424",
                       "token_count=4", "hydra.run.dir=" + sys.argv[2]], capture_output=True, text=True)
assert proc.returncode == 0, proc.stderr
"""


def _shipped_files() -> list[str]:
    """Every tracked file of the folders that install as packages, as ``package:relative/path``."""
    files = []
    for folder, package in PACKAGE_DIRS.items():
        tracked = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True).stdout.split()
        files += [f"{package}:{Path(f).relative_to(folder)}" for f in tracked]
    return files


def fresh_venv(tmp_path: Path, *projects: Path) -> Path:
    """A new venv holding non-editable wheels of ``projects``; dependencies (torch etc.) come from
    the test environment through a path entry placed after the venv's own site-packages."""
    wheels = tmp_path / "wheels"
    for project in projects:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(project)], check=True, capture_output=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    return py


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(tmp_path, model_paths):
    py = fresh_venv(tmp_path, REPO)
    files = _shipped_files()
    assert any(f.startswith("rwkvkit.plugins:") for f in files)
    # a RuntimeWarning here would be the native kernels failing to build from the installed sources
    proc = subprocess.run([str(py), "-W", "error::RuntimeWarning", "-c", CHECK, str(model_paths["tiny"]), *files], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (2048,)" in proc.stdout
    run = subprocess.run([str(py), "-c", RUN_CHECK, str(model_paths["world"]), str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "output.txt").read_text()


EXAMPLE_CHECK = r"""
import json, subprocess, sys
from rwkvkit import PIPELINE, RWKV
pipeline = PIPELINE(RWKV(sys.argv[1], "cpu fp32"), "rwkv_vocab_v20230424")
text = pipeline.generate("Hello", 8, sampler="top_a", sampler_options={"a": 0.3}, seed=1)
assert text == pipeline.generate("Hello", 8, sampler="top_a", sampler_options={"a": 0.3}, seed=1)
listing = json.loads(subprocess.run([sys.executable, "-m", "rwkvkit.cli", "plugins", "--json"], capture_output=True, text=True, check=True).stdout)
top_a = [p for p in listing if p["name"] == "top_a"][0]
print(top_a["distribution"], top_a["version"], top_a["registers"])
run = [sys.executable, "-m", "rwkvkit.cli", "run", f"model.path={sys.argv[1]}", "model.tokenizer=rwkv_vocab_v20230424"]
help_text = subprocess.run(run + ["--help"], capture_output=True, text=True, check=True).stdout
assert "top_a" in help_text, help_text
proc = subprocess.run(run + ["sampling=top_a", "sampling.options.a=0.3", "token_count=5", "hydra.run.dir=" + sys.argv[2]], capture_output=True, text=True)
assert proc.returncode == 0, proc.stderr
print("cli ok")
"""


@pytest.mark.slow
def test_example_third_party_sampler_is_found_by_name(tmp_path, model_paths):
    py = fresh_venv(tmp_path, REPO, REPO / "examples" / "rwkvkit-top-a")
    proc = subprocess.run([str(py), "-c", EXAMPLE_CHECK, str(model_paths["world"]), str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rwkvkit-top-a 0.1.0 {'samplers': ['top_a']}" in proc.stdout and "cli ok" in proc.stdout
    assert "name: top_a" in (tmp_path / "run" / "config.yaml").read_text()


TORCH_CPU_INDEX = " --index-url https://download.pytorch.org/whl/cpu"


def readme_cpu_setup() -> list[str]:
    """The README's set-up commands for a CPU-only machine: the bash block after that heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"\*\*CPU-only machine\*\*.*?```bash\n(.*?)```", text, re.DOTALL)
    assert block, "README lost its CPU-only set-up block"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_cpu_setup_works_literally_in_a_fresh_checkout(tmp_path):
    """Runs the README's CPU set-up in a copy of the working tree. Off this machine PyTorch's CPU
    index serves torch; here pip's configured local wheel store does, so only that option is
    dropped. The result must be a CPU torch build, and `rwkvkit run` must work."""
    commands = readme_cpu_setup()
    assert any(TORCH_CPU_INDEX in c for c in commands), commands
    source = tmp_path / "rwkvkit"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", ".ci-venv", "outputs", "multirun", "*.egg-info", "__pycache__", "build", "dist"))
    script = "set -e\n" + "\n".join(c.replace(TORCH_CPU_INDEX, "") for c in commands) + "\n"
    script += 'python -c "import torch; assert torch.version.cuda is None, torch.__version__"\nrwkvkit run token_count=4 callbacks=quiet\n'
    proc = subprocess.run(["bash", "-c", script], cwd=source, capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^rwkvkit: 4 tokens, .* run directory outputs/", proc.stderr, re.MULTILINE), proc.stderr[-2000:]
