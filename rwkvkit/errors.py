"""The exceptions rwkvkit raises for anything a user supplied (files, strategies, tokens, states).

Every message names the offending file/option/value and what was expected, so callers can show
``str(err)`` to a user as is.
"""


class RwkvkitError(Exception):
    """Base class: catch this to handle every user-facing rwkvkit failure."""


class CheckpointError(RwkvkitError):
    """A checkpoint file is missing, unreadable, of an unsupported architecture or malformed."""


class StrategyError(RwkvkitError, ValueError):
    """A strategy string is malformed or asks for something this machine cannot do."""


class InputError(RwkvkitError, ValueError):
    """Bad arguments to ``forward`` (empty input, token ids out of range, wrong types)."""


class StateError(RwkvkitError):
    """A state does not belong to this model, or a state file is unreadable."""


class PluginError(RwkvkitError):
    """A plugin name is unknown, registered twice, or a plugin failed to load."""


class TokenizerError(RwkvkitError, ValueError):
    """A tokenizer or vocabulary file is missing, unreadable or malformed."""
