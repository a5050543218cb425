"""A real (non-editable) wheel install works: code, plugins, configs and kernel sources are found
through importlib.resources, not through paths into the repository."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"plugins": "rwkvkit.plugins", "conf": "rwkvkit.conf", "kernels": "rwkvkit.kernels"}
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


def _shipped_files() -> list[str]:
    tracked = subprocess.run(["git", "ls-files", *PACKAGE_DIRS], cwd=REPO, capture_output=True, text=True).stdout.split()
    return [f"{PACKAGE_DIRS[Path(f).parts[0]]}:{Path(*Path(f).parts[1:])}" for f in tracked if "/" in f]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(tmp_path, model_paths):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(REPO)], check=True, capture_output=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    # dependencies (torch etc.) come from the test environment, appended after the venv's own site-packages
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("rwkvkit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    files = _shipped_files()
    assert any(f.startswith("rwkvkit.plugins:") for f in files)
    proc = subprocess.run([str(py), "-c", CHECK, str(model_paths["tiny"]), *files], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (2048,)" in proc.stdout
