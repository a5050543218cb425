"""The decode thread governor: keeps the configured count while it is faster, moves to one thread
when a probe shows that is faster (a neighbour on one core), and back when it no longer is."""

from __future__ import annotations

import pytest
import torch

from rwkvkit import RWKV
from rwkvkit.plugins import cpu_backend, cpu_fused
from rwkvkit.plugins.cpu_threads import PROBE_EVERY, ThreadGovernor


def drive(governor: ThreadGovernor, calls: int, seconds: dict[int, float], threads: int = 2) -> list[int]:
    """Run ``calls`` calls where a call with n threads takes ``seconds[n]``; the counts used."""
    used = []
    for _ in range(calls):
        n = governor.choose(threads)
        governor.record(n, seconds[n])
        used.append(n)
    return used


def test_idle_machine_keeps_both_threads_and_probes_rarely():
    used = drive(ThreadGovernor(), 10 * PROBE_EVERY, {2: 0.015, 1: 0.025})
    assert used.count(1) == 10  # one probe per PROBE_EVERY calls
    assert all(n == 2 for i, n in enumerate(used) if (i + 1) % PROBE_EVERY)


def test_contention_moves_to_one_thread_and_back():
    governor = ThreadGovernor()
    drive(governor, PROBE_EVERY - 1, {2: 0.015, 1: 0.025})
    contended = drive(governor, 3 * PROBE_EVERY, {2: 0.2, 1: 0.025})  # a busy neighbour: 2 threads collapse
    assert contended[PROBE_EVERY:].count(1) >= 2 * PROBE_EVERY - 1  # from the first probe on, one thread
    idle_again = drive(governor, 3 * PROBE_EVERY, {2: 0.015, 1: 0.025})
    assert idle_again[-PROBE_EVERY:].count(2) >= PROBE_EVERY - 1


def test_one_configured_thread_is_never_changed():
    assert set(drive(ThreadGovernor(), 100, {1: 0.01}, threads=1)) == {1}


def test_a_single_stall_does_not_switch():
    governor = ThreadGovernor()
    times = {2: 0.015, 1: 0.025}
    drive(governor, 10, times)
    governor.record(2, 5.0)  # one stalled call
    assert drive(governor, PROBE_EVERY, times).count(1) == 1


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16", "cpu fp32i8"])
def test_decode_is_bit_identical_for_any_thread_count(model_paths, strategy):
    """The governor may change the count between tokens: results must not depend on it (the
    kernels split work into thread-count-independent shares), or a seed would not fix the text."""
    model = RWKV(model_paths["world"], strategy)
    stage = model.stages[0]
    _, state = model.forward([1, 2, 3], None)
    x = torch.randn(1, 1, model.spec.n_embd, generator=torch.Generator().manual_seed(0)).to(stage.ops.placement.dtype)
    lib = cpu_backend.library()
    layers = [block.native for block in stage.blocks]
    outs = [cpu_fused.decode_blocks(lib, layers, x, None, state.layers, stage.ops.placement.dtype, threads) for threads in (1, 2, 3)]
    for out in outs[1:]:
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1])
        for a, b in zip(out[2], outs[0][2]):
            assert all(torch.equal(s, t) for s, t in zip(a.tensors(), b.tensors()))
