"""The built-in architectures: every RWKV generation the `rwkv` package runs, registered through
the same hook a third-party generation uses. Their math lives in ``rwkvkit.models``."""

from __future__ import annotations

from rwkvkit.hookspecs import hookimpl
from rwkvkit.models.rwkv4 import Rwkv4
from rwkvkit.models.rwkv5 import Rwkv5
from rwkvkit.models.rwkv6 import Rwkv6
from rwkvkit.models.rwkv7 import Rwkv7


@hookimpl
def register_architectures(register) -> None:
    for arch in (Rwkv7, Rwkv6, Rwkv5, Rwkv4):
        register(arch)
