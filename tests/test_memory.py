"""rwkvkit.memory: a job's peak is its own, not the process lifetime's (sweeps run jobs in one process)."""

from __future__ import annotations

import sys

import pytest
import torch

from rwkvkit import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak reset uses Linux's /proc/self/clear_refs")
def test_reset_peak_forgets_an_earlier_job():
    big = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MB, touched
    before = memory.peak_mb()
    del big
    memory.reset_peak()
    after = memory.peak_mb()
    resident, _ = memory.rss_mb()
    assert before - after > 200  # the earlier 256 MB no longer counts
    assert after >= resident - 1
