"""How idle CPU threads wait: decided before torch loads libgomp, which reads its policy once, then.

libgomp's default keeps a thread spinning for ~300,000 iterations (milliseconds) after every
parallel region. A decoded token passed ~85 regions, so next to a busy process two threads on two
cores fought that spinning for the cores (0.1B ``cpu fp32`` decode: ~53 -> ~13 tok/s). Making
libgomp sleep at once instead (``OMP_WAIT_POLICY=PASSIVE``) cost an idle machine 25-40%: a sleeping
thread takes tens of microseconds to wake on a VM, ~85 times per token. So, unless the user chose
a policy, rwkvkit does both halves of the job where each is cheap:

- libgomp's threads spin only briefly (``GOMP_SPINCOUNT=3000``: ~75 us of ``pause`` on this
  project's CPU, ~1% of libgomp's default), set here when ``rwkvkit`` is imported before torch
  (``rwkvkit`` commands always are). A prefill's GEMMs and torch's own ops follow each other
  within that, so their threads stay awake (``0`` here, sleeping at once, cost an idle 512-token
  prefill 5-12%), while a waiting thread never holds a core a busy neighbour wants for long;
- decode runs on the CPU kernels' own pool (``kernels/cpu_pool.h``), whose threads spin a few
  microseconds, then yield their core to whoever wants it for up to 2 ms, then sleep.

The pool needs the first half: a libgomp thread spinning for milliseconds after a torch op takes
the core a pool thread needs (idle ``cpu bf16`` decode lost 10-20% that way). Where libgomp spins
longer than :data:`SHORT_SPIN` (torch loaded first, or the user's choice), decode therefore stays
on OpenMP regions. ``GOMP_SPINCOUNT`` and not ``OMP_WAIT_POLICY`` is what rwkvkit sets because
the pool reads the latter as the user's choice for itself too (``PASSIVE``: its threads sleep at
once), and child processes inherit it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # variables by which a user chose a policy: left alone
SHORT_SPIN = 3000  # libgomp spin iterations after a region that still leave decode to the pool (see above)


def quiet_openmp(environ: MutableMapping[str, str] = os.environ, torch_loaded: bool | None = None) -> bool:
    """Make libgomp's threads spin only briefly, unless torch (so libgomp) has loaded already or
    the user chose a policy; returns whether it set anything."""
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if torch_loaded or any(environ.get(k, "").strip() for k in USER_KNOBS):
        return False
    environ["GOMP_SPINCOUNT"] = str(SHORT_SPIN)
    return True


def openmp_spins(environ: Mapping[str, str]) -> bool:
    """Whether libgomp's threads spin longer than :data:`SHORT_SPIN` after a region, by the
    variables it read when it loaded (``GOMP_SPINCOUNT`` wins over ``OMP_WAIT_POLICY``, as in libgomp)."""
    count = environ.get("GOMP_SPINCOUNT", "").strip()
    if count:
        return not count.isdigit() or int(count) > SHORT_SPIN  # "infinite", "10k" and the like spin long too
    return environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"
