"""rwkvkit: run RWKV language models from Python, with a ChatRWKV-compatible API."""

from rwkvkit.compat import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.errors import CheckpointError, InputError, PluginError, RwkvkitError, StateError, StrategyError, TokenizerError
from rwkvkit.state import State

__version__ = "0.1.0"
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
