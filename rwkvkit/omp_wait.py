"""How idle CPU threads wait: decided before torch loads libgomp, which reads its policy once, then.

libgomp's default keeps a thread spinning for ~300,000 iterations (milliseconds) after every
parallel region. A decoded token passes ~85 regions, so next to a busy process two threads on two
cores fight that spinning for the cores (0.1B ``cpu fp32`` decode: ~53 -> ~13 tok/s). Making
libgomp sleep at once instead (``OMP_WAIT_POLICY=PASSIVE``) cost an idle machine 25-40%: a sleeping
thread takes tens of microseconds to wake on a VM, ~85 times per token. So, unless the user chose
a policy, rwkvkit does both halves of the job where each is cheap:

- libgomp's threads sleep at once (``GOMP_SPINCOUNT=0``, set here when ``rwkvkit`` is imported
  before torch; ``rwkvkit`` commands always are), which costs only the regions that remain
  OpenMP's: a prefill's GEMM-sized ones and torch's own ops;
- decode runs on the CPU kernels' own pool (``kernels/cpu_pool.h``), whose threads spin a few
  microseconds, then yield their core to whoever wants it for up to 2 ms, then sleep.

The pool needs the first half: a libgomp thread still spinning after a torch op takes the core a
pool thread needs (idle ``cpu bf16`` decode lost 10-20% that way). Where torch loaded first with
libgomp spinning, decode therefore stays on OpenMP regions, as the user's environment chose.
``GOMP_SPINCOUNT`` and not ``OMP_WAIT_POLICY`` is what rwkvkit sets because the pool reads the
latter as the user's choice for itself too (``PASSIVE``: its threads sleep at once), and child
processes inherit it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # variables by which a user chose a policy: left alone


def quiet_openmp(environ: MutableMapping[str, str] = os.environ, torch_loaded: bool | None = None) -> bool:
    """Make libgomp's threads sleep at once, unless torch (so libgomp) has loaded already or the
    user chose a policy; returns whether it set anything."""
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if torch_loaded or any(environ.get(k, "").strip() for k in USER_KNOBS):
        return False
    environ["GOMP_SPINCOUNT"] = "0"
    return True


def openmp_spins(environ: Mapping[str, str]) -> bool:
    """Whether libgomp's threads spin after a region, by the variables it read when it loaded
    (``GOMP_SPINCOUNT`` wins over ``OMP_WAIT_POLICY``, as in libgomp)."""
    count = environ.get("GOMP_SPINCOUNT", "").strip()
    if count:
        return not count.isdigit() or int(count) > 0  # "infinite", "10k" and the like spin too
    return environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"
