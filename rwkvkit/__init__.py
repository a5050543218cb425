"""rwkvkit: run RWKV language models from Python, with a ChatRWKV-compatible API.

The model classes are imported on first use, so ``rwkvkit`` commands start (and answer Ctrl-C)
before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rwkvkit.errors import CheckpointError, InputError, PluginError, RwkvkitError, StateError, StrategyError, TokenizerError
from rwkvkit.omp_wait import quiet_openmp

quiet_openmp()  # before anything loads torch (see rwkvkit.omp_wait)

if TYPE_CHECKING:
    from rwkvkit.compat import PIPELINE, PIPELINE_ARGS, RWKV
    from rwkvkit.state import State

__version__ = "0.1.0"
_LAZY = {"PIPELINE": "rwkvkit.compat", "PIPELINE_ARGS": "rwkvkit.compat", "RWKV": "rwkvkit.compat", "State": "rwkvkit.state"}
__all__ = [
    "PIPELINE",
    "PIPELINE_ARGS",
    "RWKV",
    "State",
    "CheckpointError",
    "InputError",
    "PluginError",
    "RwkvkitError",
    "StateError",
    "StrategyError",
    "TokenizerError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'rwkvkit' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
