"""The CUDA sources in kernels/ compile for sm_80 (A100) and sm_90 (H100) with the flags torch's
extension builder adds, within a resource budget read from ptxas: no register spills or stack, and
registers and shared memory that fit a block on an SM. The torch binding compiles against the
installed torch headers. No GPU needed, only nvcc (skipped with a reason where it is absent).

``python tests/test_kernel_compile.py`` prints the per-kernel register / shared-memory table.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
KERNELS = resources.files("rwkvkit.kernels")
CU_SOURCES = sorted(p.name for p in KERNELS.iterdir() if p.name.endswith(".cu"))
# kernel -> (threads per block, its __launch_bounds__; instantiations per arch: 3 activation dtypes,
# for the matvec x 8 batch-row counts x 3 team sizes)
KERNEL_FAMILIES = {
    "wkv7_kernel": (128, 3),
    "matvec_kernel": (128, 72),
    "ln_mix_kernel": (256, 3),
    "wkv7_decode_kernel": (256, 3),
}
REGISTERS_PER_SM, STATIC_SMEM_LIMIT = 65536, 48 * 1024

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not found; the CUDA sources are compile-checked where it is installed")


@dataclass(frozen=True)
class Usage:
    registers: int
    smem: int
    stack: int
    spill_stores: int
    spill_loads: int


def _family(kernel: str) -> str:
    return next((f for f in KERNEL_FAMILIES if f in kernel), kernel)


def parse_ptxas(report: str) -> dict[tuple[str, str], Usage]:
    """``-Xptxas -v`` output -> {(mangled kernel, arch): Usage}."""
    usages = {}
    for m in re.finditer(r"Compiling entry function '(\S+)' for '(sm_\d+)'(.*?)(?=Compiling entry function|\Z)", report, re.S):
        body = m[3]
        stack, stores, loads = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body).groups())
        smem = re.search(r"(\d+) bytes smem", body)
        usages[m[1], m[2]] = Usage(int(re.search(r"Used (\d+) registers", body)[1]), int(smem[1]) if smem else 0, stack, stores, loads)
    return usages


def nvcc_flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what torch's JIT build passes

    return [*COMMON_NVCC_FLAGS, "-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-v", *(f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS)]


def compile_all(out_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    """Each .cu once, for every arch in one nvcc call (one front-end pass)."""
    results = {}
    for name in CU_SOURCES:
        command = [NVCC, *nvcc_flags(), "-c", str(KERNELS.joinpath(name)), "-o", str(out_dir / f"{name}.o")]
        results[name] = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    return compile_all(tmp_path_factory.mktemp("nvcc"))


@pytest.mark.parametrize("source", CU_SOURCES)
def test_compiles_without_warnings(compiled, source):
    result = compiled[source]
    assert result.returncode == 0, result.stderr[-3000:]
    assert not re.search(r"warning", result.stdout + result.stderr, re.I), result.stderr[-3000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_resources_fit_without_spills(compiled, arch):
    usages = {kernel: u for r in compiled.values() for (kernel, a), u in parse_ptxas(r.stdout + r.stderr).items() if a == arch}
    per_family = {f: sum(_family(k) == f for k in usages) for f in KERNEL_FAMILIES}
    assert per_family == {f: n for f, (_, n) in KERNEL_FAMILIES.items()}, per_family
    for kernel, u in usages.items():
        threads = KERNEL_FAMILIES[_family(kernel)][0]
        assert u.spill_stores == u.spill_loads == u.stack == 0, (kernel, u)
        assert u.registers * threads <= REGISTERS_PER_SM and u.smem <= STATIC_SMEM_LIMIT, (kernel, u)


def test_torch_binding_compiles():
    """Syntax and types of rwkvkit_ops.cpp against this torch's headers (a CPU-only torch ships the
    CUDA headers too, minus one generated file that C10_USING_CUSTOM_GENERATED_MACROS skips)."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    dryrun = subprocess.run([NVCC, "--dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True, text=True).stderr
    cuda_includes = re.search(r'INCLUDES="([^"]*)"', dryrun)[1].split()  # nvcc's own -I for the CUDA headers
    command = [compiler, "-std=c++20", "-fsyntax-only", "-DC10_USING_CUSTOM_GENERATED_MACROS", *(f"-I{p}" for p in include_paths()),
               *cuda_includes, str(KERNELS.joinpath("rwkvkit_ops.cpp"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        reports = compile_all(Path(tmp))
    usages = {key: u for r in reports.values() for key, u in parse_ptxas(r.stdout + r.stderr).items()}
    names = _demangle([kernel for kernel, _ in usages])
    print(f"{'kernel':<70} {'arch':<6} {'regs':>4} {'smem':>6} {'stack':>5} {'spills':>6}")
    for name, ((_, arch), u) in sorted(zip(names, usages.items()), key=lambda x: (x[1][0][1], x[0])):
        short = re.sub(r"^rwkvkit::\(anonymous namespace\)::", "", name).replace("__nv_bfloat16", "bf16").replace("__half", "f16")
        print(f"{short[:70]:<70} {arch:<6} {u.registers:>4} {u.smem:>6} {u.stack:>5} {u.spill_stores + u.spill_loads:>6}")
    sys.exit(any(r.returncode for r in reports.values()))
