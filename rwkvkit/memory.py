"""This process's memory, as ``rwkvkit run`` reports it: resident and peak resident set size.

Peak RSS is a process-lifetime maximum, so a sweep that runs its jobs in one process would report
every earlier job's peak; :func:`reset_peak` starts a new count (Linux ``/proc/self/clear_refs``).
Pages of a memory-mapped checkpoint that were read count as resident, as the kernel counts them.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def rss_mb() -> tuple[float, float]:
    """``(resident, peak resident)`` in MB; where ``/proc`` is missing, both are the lifetime peak."""
    try:
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return peak, peak


def reset_peak() -> None:
    """Start a new peak count (host RSS, and CUDA's allocator where a GPU is in use)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS
    except OSError:
        pass  # not Linux, or /proc not writable: the lifetime peak is reported instead


def peak_mb() -> float:
    """The peak since :func:`reset_peak`: GPU memory allocated when a GPU was used, else host RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mb()[1]
