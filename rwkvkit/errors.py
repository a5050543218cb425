"""The exceptions rwkvkit raises for anything a user supplied (files, strategies, tokens, states).

Every message names the offending file/option/value and what was expected, so callers can show
``str(err)`` to a user as is.
"""

import signal
import sys
from typing import NoReturn


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


class ConstraintError(RwkvkitError, ValueError):
    """A JSON schema, regex or grammar for structured output is invalid, or generation left it."""


class RunDirError(RwkvkitError):
    """A run directory already holds other files, or cannot be created or written."""


class UsageError(RwkvkitError):
    """The ``rwkvkit run`` command line or the config it composes is invalid (Hydra's messages too)."""


class SweepError(RwkvkitError):
    """Some jobs of a ``rwkvkit run -m`` sweep failed (each is recorded in its run directory)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers such as SLURM send), raised like Ctrl-C's KeyboardInterrupt so a
    run stops the same way, keeping its partial output, but is recorded as terminated."""

    stop_reason = "terminated"
    exit_code = 128 + signal.SIGTERM


def stop_of(exc: KeyboardInterrupt) -> tuple[str, int]:
    """(stop reason, exit code) of a stop: ``("interrupted", 130)`` for Ctrl-C, Terminated's own."""
    return getattr(exc, "stop_reason", "interrupted"), getattr(exc, "exit_code", 128 + signal.SIGINT)


EXIT_ERROR = 2  # the exit status of a user error (argparse's too)


def report(error: RwkvkitError) -> int:
    """Show a user error the way every one is shown: one line on stderr. Returns the exit code, 2."""
    print(f"rwkvkit: error: {error}", file=sys.stderr)
    return EXIT_ERROR


def fail(error: RwkvkitError) -> NoReturn:
    """report() and exit, from code that Hydra runs (the exit passes through it to the CLI)."""
    sys.exit(report(error))
