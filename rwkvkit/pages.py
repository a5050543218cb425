"""Dropping a memory-mapped tensor's pages from this process once they have been read.

Pages of a mapped checkpoint that a process has touched count in its resident memory for as long
as the mapping lives, which is as long as any tensor of the checkpoint is referenced. A backend that
turns a matrix into something else (int8 codes) reads it once; ``madvise(MADV_DONTNEED)`` then
unmaps those pages from this process. For a page of a file that was only read that loses nothing:
a later read faults the same bytes in again from the file (or the page cache). For a page this
process wrote (anonymous memory, or its own copy of a private file page) it would lose the data,
so :func:`release` acts only when ``/proc/self/pagemap`` shows no such page in the range.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import numpy as np
import torch

_MADV_DONTNEED = 4  # Linux
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61  # /proc/<pid>/pagemap entry bits


def release(tensor: torch.Tensor) -> bool:
    """Unmap the whole pages inside ``tensor``'s bytes from this process when every one of them is
    a page of a file (or not there at all), Linux only; True when it did. Partial pages at either
    end are kept: neighbouring tensors use them."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or tensor.device.type != "cpu" or not tensor.is_contiguous() or not _only_file_pages(lo, hi):
        return False
    return _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0


def _only_file_pages(lo: int, hi: int) -> bool:
    """Whether every page in ``[lo, hi)`` is absent or a file (or shared-memory) page: none is an
    anonymous page, present or swapped out, whose contents exist nowhere else."""
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(lo // mmap.PAGESIZE * 8)
            entries = np.frombuffer(pagemap.read((hi - lo) // mmap.PAGESIZE * 8), dtype=np.uint64)
    except OSError:  # not Linux, or no access
        return False
    present, swapped, file = ((entries & np.uint64(bit)) != 0 for bit in (_PRESENT, _SWAPPED, _FILE))
    return len(entries) == (hi - lo) // mmap.PAGESIZE and not (swapped | present & ~file).any()


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
