"""The CPU kernels' thread pool (kernels/cpu_pool.h): results that do not depend on the thread count
or on who ran a share, the wait policy from the environment, idle threads that use no CPU, fork
safety, concurrent callers, and the pool alone under ThreadSanitizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import torch

from rwkvkit import RWKV, omp_wait
from rwkvkit.errors import InputError
from rwkvkit.models import rwkv7
from rwkvkit.native import cpu
from rwkvkit.plugins.cpu_backend import CpuBackend
from rwkvkit.quant import quantize_per_channel
from rwkvkit.state import LayerState
from rwkvkit.testing import make_checkpoint

HERE = Path(__file__).parent
POOL = {"RWKVKIT_CPU_POOL": "pool"}  # the kernels' own pool, whatever libgomp does
OMP = {"RWKVKIT_CPU_POOL": "omp"}  # OpenMP regions


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """``code`` in a fresh interpreter (the policy is read once per process; a deadlock or a crash
    fails the test instead of hanging or killing pytest); returns its stdout. The policy variables
    come from ``env`` alone, not from this process (which set GOMP_SPINCOUNT if it imported rwkvkit
    before torch)."""
    inherited = {k: v for k, v in os.environ.items() if k not in (*omp_wait.USER_KNOBS, "RWKVKIT_CPU_POOL")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout, env={**inherited, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """C = 512, so that one token's products are worth the pool (project's 64-row threshold) and a
    64-token ln_mix too; 2 layers keep it quick."""
    return make_checkpoint(tmp_path_factory.mktemp("pool") / "m.pth", n_layer=2, n_embd=512, vocab_size=1024, seed=3)


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16"])
def test_prefill_ops_are_bit_identical_for_any_thread_count(small_model, monkeypatch, strategy):
    """A prefill block (ln_mix's two passes, time_mix_core's scan, relu² after the GEMM) with the
    kernels on 1 to 4 threads (OpenMP regions outside decode); torch's GEMMs keep one count."""
    model = RWKV(small_model, strategy, backend="cpu")
    ops, spec, dtype = model.stages[0].ops, model.spec, model.stages[0].ops.placement.dtype
    g = torch.Generator().manual_seed(0)
    B, T, C, H, N = 2, 64, spec.n_embd, spec.n_head, spec.head_size
    x, v_first = (torch.randn(B, T, C, generator=g).to(dtype) for _ in range(2))
    state = LayerState(torch.randn(B, C, generator=g).to(dtype), torch.randn(B, H, N, N, generator=g) * 0.3, torch.randn(B, C, generator=g).to(dtype))
    outs = []
    for threads in (1, 3, 2, 4, 1):
        monkeypatch.setattr(CpuBackend, "threads", property(lambda self, n=threads: n))
        x_out, vf, s = rwkv7.block(ops, model.stages[0].blocks[1], x, v_first, state)
        outs.append((x_out, vf, *s.tensors()))
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))


def wkv_inputs(B: int, T: int, H: int, N: int) -> list[torch.Tensor]:
    """``kv, r, decay, k, v, kk, a`` at a real run's scale (the scan stays finite: NaN != NaN)."""
    g = torch.Generator().manual_seed(1)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    decay = torch.exp(-0.6065 * torch.rand(B, T, H, N, generator=g))
    return [torch.randn(B, H, N, N, generator=g) * 0.1, r, decay, k, v, kk, torch.rand(B, T, H, N, generator=g)]


def test_scan_and_int8_prefill_kernels_are_bit_identical_for_any_thread_count():
    kv, r, decay, k, v, kk, a = wkv_inputs(2, 16, 4, 32)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g)
    weight = quantize_per_channel(w)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3, 2):
            torch.set_num_threads(threads)  # int8_gemm's quantize and rescale kernels follow torch's count
            outs.append((*cpu.wkv(kv, r, decay, k, v, kk, a, threads), cpu.int8_gemm(x, weight), cpu.relu_square_(x.clone())))
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(out, outs[0]))


CONCURRENT = """
import sys, threading
import torch
from rwkvkit import RWKV, omp_wait
from rwkvkit.native import cpu
model = RWKV(sys.argv[1], "cpu fp32")
layers = [block.native for block in model.stages[0].blocks]
_, state = model.forward([1, 2, 3], None)
xs = [torch.randn(1, 1, model.spec.n_embd, generator=torch.Generator().manual_seed(i)) for i in range(2)]
serial = [cpu.decode_stage(layers, x, None, state.layers, torch.float32, 2)[0] for x in xs]
got = [[], []]
def decode(i):
    for _ in range(20):
        got[i].append(cpu.decode_stage(layers, xs[i], None, state.layers, torch.float32, 2)[0])
workers = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(sum(len(got[i]) == 20 and all(torch.equal(y, serial[i]) for y in got[i]) for i in range(2)))
"""


@pytest.mark.parametrize("env", [POOL, OMP], ids=["pool", "omp"])
def test_concurrent_callers_get_the_results_of_serial_calls(small_model, env):
    """ctypes releases the GIL, so two Python threads reach the kernels at once: with the pool, the
    second waits its turn."""
    assert run_python(CONCURRENT, str(small_model), env=env).split() == ["2"]


@pytest.mark.parametrize(
    "env, mode",
    [
        ({}, cpu._OPENMP),  # libgomp's default spins: a pool thread would lose its core to it
        ({"GOMP_SPINCOUNT": "3000"}, cpu._POOL),  # what rwkvkit sets when it loads before torch
        ({"GOMP_SPINCOUNT": "0"}, cpu._POOL),
        ({"GOMP_SPINCOUNT": "3001"}, cpu._OPENMP),  # longer than SHORT_SPIN
        ({"GOMP_SPINCOUNT": "10k", "OMP_WAIT_POLICY": "PASSIVE"}, cpu._OPENMP),  # the count wins, as in libgomp
        ({"OMP_WAIT_POLICY": "passive"}, cpu._PASSIVE),
        (POOL, cpu._POOL),
        ({**POOL, "OMP_WAIT_POLICY": "passive"}, cpu._PASSIVE),
        ({**POOL, "OMP_WAIT_POLICY": " ACTIVE"}, cpu._ACTIVE),
        ({**OMP, "OMP_WAIT_POLICY": "PASSIVE"}, cpu._OPENMP),
        ({**OMP, "GOMP_SPINCOUNT": "0"}, cpu._OPENMP),
    ],
)
def test_wait_policy_follows_the_environment(env, mode):
    assert cpu.wait_policy(env) == (mode, cpu.SPIN_NS, cpu.YIELD_NS)


def test_a_bad_pool_setting_is_an_error_and_a_bad_omp_policy_a_warning():
    with pytest.raises(InputError, match="RWKVKIT_CPU_POOL='gomp': expected 'pool'"):
        cpu.wait_policy({"RWKVKIT_CPU_POOL": "gomp"})
    with pytest.warns(RuntimeWarning, match="OMP_WAIT_POLICY='spin' is neither ACTIVE nor PASSIVE: ignored"):
        assert cpu.wait_policy({**POOL, "OMP_WAIT_POLICY": "spin"})[0] == cpu._POOL


@pytest.mark.parametrize(
    "env, torch_loaded, sets",
    [({}, False, True), ({}, True, False), ({"OMP_WAIT_POLICY": "ACTIVE"}, False, False), ({"GOMP_SPINCOUNT": "300000"}, False, False), ({"OMP_WAIT_POLICY": " "}, False, True)],
)
def test_rwkvkit_quiets_openmp_only_before_torch_and_without_a_users_choice(env, torch_loaded, sets):
    environ = dict(env)
    assert omp_wait.quiet_openmp(environ, torch_loaded) is sets
    assert environ == ({**env, "GOMP_SPINCOUNT": str(omp_wait.SHORT_SPIN)} if sets else env)


# Prints how many pool threads one decode started and GOMP_SPINCOUNT as the process saw it.
IMPORT_ORDER = """
import os, sys, time
if sys.argv[2] == "torch first":
    import torch
import rwkvkit
import torch
torch.set_num_threads(2)
model = rwkvkit.RWKV(sys.argv[1], "cpu fp32")
_, state = model.forward([1, 2], None)
model.forward([3], state)
for _ in range(100):  # a pool thread names itself once it runs
    comms = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    if "rwkvkit-pool" in comms:
        break
    time.sleep(0.01)
print(comms.count("rwkvkit-pool"), os.environ.get("GOMP_SPINCOUNT", "unset"))
"""


def test_decode_runs_on_the_pool_by_default_and_on_openmp_when_libgomp_already_spins(small_model):
    """``import rwkvkit`` before torch (as every rwkvkit command does) makes libgomp spin briefly
    and decode use the pool; torch imported first has fixed libgomp's spinning, so decode keeps
    OpenMP's regions and the environment is left alone."""
    assert run_python(IMPORT_ORDER, str(small_model), "rwkvkit first").split() == ["1", "3000"]
    assert run_python(IMPORT_ORDER, str(small_model), "torch first").split() == ["0", "unset"]


CHANGED = """
import os
import torch
from rwkvkit.backend import Epilogue
from rwkvkit.errors import InputError
from rwkvkit.native import cpu
cpu.project([torch.randn(2, 256)], [torch.randn(256, 256)], [Epilogue.NONE], None, 2)  # decoded rows: the pool runs
cpu.library.cache_clear()
assert cpu.library() is not None  # the same policy again: fine
os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
cpu.library.cache_clear()
try:
    cpu.library()
except InputError as exc:
    print(exc)
"""


def test_a_changed_policy_is_refused_once_the_pool_runs():
    """Its threads read the policy unlocked, so it is set once; loading the library again (its
    cache cleared) with the same environment is fine, with another one a clear error."""
    out = run_python(CHANGED, env={**POOL, "OMP_WAIT_POLICY": "PASSIVE"})
    assert "OMP_WAIT_POLICY or RWKVKIT_CPU_POOL changed after the CPU kernels started" in out


# Decodes with 3 threads, then prints the pool threads' count and the CPU seconds (process, pool
# threads) used while the process sleeps 0.5 s, then the output's bytes.
IDLE = """
import os, sys, time
import torch
from rwkvkit import RWKV, omp_wait
torch.set_num_threads(3)
model = RWKV(sys.argv[1], "cpu fp32")
out, state = model.forward([1], None)
for token in range(5):
    out, state = model.forward([token], state)
def pool_ticks():
    ticks = []
    for tid in os.listdir("/proc/self/task"):
        if open(f"/proc/self/task/{tid}/comm").read().strip() == "rwkvkit-pool":
            stat = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            ticks.append(int(stat[11]) + int(stat[12]))
    return ticks
before, cpu0 = pool_ticks(), time.process_time()
time.sleep(0.5)
used, after = time.process_time() - cpu0, pool_ticks()
print(len(after), used, (sum(after) - sum(before)) / os.sysconf("SC_CLK_TCK"))
print(out.numpy().tobytes().hex())
"""


def test_idle_pool_threads_use_no_cpu_and_the_policies_agree_on_results(small_model):
    """After a decode, the pool threads spin a few microseconds, yield for 2 ms, then sleep: 0.5 s
    of sleep costs the process < 0.05 s of CPU (a thread left spinning would use ~0.5 s; the rest
    is slack for clock ticks and the interpreter). With OMP_WAIT_POLICY=ACTIVE they do spin (so
    the measurement sees them), and with RWKVKIT_CPU_POOL=omp there is no pool. All give the same bytes."""
    runs = {name: run_python(IDLE, str(small_model), env=env).split() for name, env in
            (("pool", POOL), ("active", {**POOL, "OMP_WAIT_POLICY": "ACTIVE"}), ("omp", OMP))}  # fmt: skip
    threads, used, pool_cpu, logits = runs["pool"]
    assert int(threads) == 2 and float(used) < 0.05 and float(pool_cpu) < 0.05
    threads, used, pool_cpu, active_logits = runs["active"]
    assert int(threads) == 2 and float(pool_cpu) > 0.05  # two threads spinning: ~1 s idle, less on a loaded machine
    threads, _, _, omp_logits = runs["omp"]
    assert int(threads) == 0
    assert logits == active_logits == omp_logits


FORK = """
import os, signal, sys, threading
import torch
from rwkvkit.backend import Epilogue
from rwkvkit.native import cpu
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)  # torch's own OpenMP (libgomp) is not fork-safe: only our kernels run threads
gen = torch.Generator().manual_seed(0)
x, w = torch.randn(2, 1024, generator=gen), torch.randn(4096, 1024, generator=gen)
def product(threads):  # decoded rows: a job of the pool (other ops run as OpenMP regions)
    return cpu.project([x], [w], [Epilogue.NONE], None, threads)
want = product(2)
assert all(t.isfinite().all() for t in want)
stop = threading.Event()
def busy():  # keeps the pool in a job most of the time, so that forks land mid-job
    while not stop.is_set():
        product(2)
thread = threading.Thread(target=busy)
thread.start()
failed = 0
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # a deadlocked child dies (and counts as failed) rather than outliving the test
        got = product(3)
        os._exit(0 if all(torch.equal(a, b) for a, b in zip(got, want)) else 1)
    failed += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
stop.set()
thread.join()
print(failed)
"""


def test_a_forked_child_gets_a_working_pool():
    """Children forked while another thread runs pool jobs: each must compute (on a pool of its
    own) without waiting for threads or a lock that fork() did not copy (a child that deadlocks
    is killed by its alarm). Without the pool's pthread_atfork handler, this hangs."""
    assert run_python(FORK, str(HERE), env=POOL, timeout=120).split() == ["0"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("mode", [cpu._POOL, cpu._ACTIVE, cpu._PASSIVE])
def test_the_pool_alone_under_thread_sanitizer(tmp_path, mode):
    """tests/cpu_pool_harness.cpp, built with -fsanitize=thread: any data race in the pool (e.g. a
    share reading what another share of the previous job wrote, unordered) fails it."""
    exe = tmp_path / "harness"
    kernels = Path(str(resources.files("rwkvkit.kernels")))
    build = subprocess.run(["g++", "-std=c++17", "-O1", "-g", "-fsanitize=thread", "-fopenmp", "-march=native", "-I", str(kernels), str(HERE / "cpu_pool_harness.cpp"), "-o", str(exe)], capture_output=True, text=True)
    if build.returncode and "tsan" in build.stderr:
        pytest.skip(f"no ThreadSanitizer runtime here: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe), str(mode)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.stdout, run.stderr[-3000:])
