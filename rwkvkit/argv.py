"""The ``rwkvkit run`` command line as people type it, rewritten into Hydra overrides.

Hydra's override grammar gives ``,``, quotes, ``=``, brackets, parentheses, ``*`` and ``->``
special meanings, so ``prompt="Hello, world!"`` or ``strategy.spec="cuda fp16 *12 -> cpu fp32"``
would fail to parse. The values of the free-text keys below are therefore taken literally
(everything after the first ``=``) and handed to Hydra quoted, with OmegaConf's ``${`` escaped:

- with ``-m``, commas separate the values to sweep, each then taken literally;
- a value already in Hydra's quotes (``"prompt='Hello, world!'"``, ``-m "prompt='a, b','c'"``) is
  Hydra's to read, as before;
- ``--prompt TEXT`` is one literal prompt, sweep or not; with no prompt given, a prompt piped or
  redirected on stdin (``echo text | rwkvkit run``) is used.

Hydra's own errors (its argument parser's, the override parser's, composition's) become one line.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from typing import NoReturn, TextIO

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import HydraException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from rwkvkit.errors import UsageError

FREE_TEXT_KEYS = ("prompt", "prompt_file", "prompts_file", "model.path", "model.tokenizer", "model.state", "strategy.spec")
PROMPT_KEYS = ("prompt", "prompt_file", "prompts_file")  # any of them: stdin is not read as the prompt
SWEEP_FLAGS = ("-m", "--multirun")
_INTERPOLATION = re.compile(r"(\\*)\$\{")


def literal(text: str) -> str:
    """An override value that Hydra and OmegaConf read back as exactly ``text``."""
    escaped = _INTERPOLATION.sub(lambda m: m.group(1) * 2 + r"\${", text)  # OmegaConf's escape rule
    return QuotedString(text=escaped, quote=Quote.single).with_quotes()


def _hydra_quoted(override: str, value: str) -> bool:
    """Whether the user already wrote ``value`` in Hydra's own quoting."""
    if value[:1] not in ("'", '"'):
        return False
    try:
        OverridesParser.create().parse_override(override)
    except HydraException:
        return False
    return True


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+")


def quote_free_text(override: str, sweep: bool) -> str:
    """``key=value`` with a free-text key's value made literal; any other argument unchanged."""
    key, eq, value = override.partition("=")
    if not eq or key.lstrip("+") not in FREE_TEXT_KEYS or _hydra_quoted(override, value):
        return override
    values = [v.strip() for v in value.split(",")] if sweep else [value]
    return f"{key}={','.join(literal(v) for v in values)}"


def shown(override: str) -> str:
    """An override as the user typed it: a free-text value without the quotes added above
    (for the messages and the sweep summary that list a job's overrides)."""
    if _key(override) not in FREE_TEXT_KEYS:
        return override
    try:
        value = OverridesParser.create().parse_override(override).value()
    except HydraException:
        return override
    return f"{override.partition('=')[0]}={value}" if isinstance(value, str) else override


def _piped_text(stdin: TextIO) -> str | None:
    """What was piped or redirected into stdin; None for a terminal or a device such as /dev/null."""
    try:
        mode = os.fstat(stdin.fileno()).st_mode
    except (OSError, ValueError):
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        return None
    return stdin.read()


def hydra_overrides(args: list[str], stdin: TextIO = sys.stdin) -> list[str]:
    """Hydra's command line for ``rwkvkit run ARGS``: free-text values quoted, ``--prompt TEXT``
    and a piped prompt turned into ``prompt=...``."""
    sweep = any(a in SWEEP_FLAGS for a in args)
    out: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--prompt" or arg.startswith("--prompt="):
            text = arg.partition("=")[2] if "=" in arg else next(rest, None)
            if text is None:
                raise UsageError("--prompt: expected the prompt text after it")
            out.append(f"prompt={literal(text)}")
        else:
            out.append(quote_free_text(arg, sweep))
    if not any(_key(a) in PROMPT_KEYS for a in out):
        piped = _piped_text(stdin)
        if piped:
            out.append(f"prompt={literal(piped)}")
    return out


def _refuse(message: str) -> NoReturn:
    raise UsageError(f"{message} (rwkvkit run --help)")


def check_flags(overrides: list[str]) -> None:
    """Parse the command line with Hydra's own argument parser (hydra.main parses it again), so a
    bad flag is one line instead of argparse's usage text; a word without ``=`` is named."""
    parser = get_args_parser()
    parser.prog, parser.error = "rwkvkit run", _refuse  # type: ignore[method-assign]
    parsed = parser.parse_args(overrides)
    stray = next((o for o in parsed.overrides if "=" not in o and not o.startswith("~")), None)
    if stray is not None:
        raise UsageError(f"{stray!r}: expected key=value or group=option; a prompt is given as prompt=\"...\" or --prompt \"...\"")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip().rstrip(".") if lines else type(exc).__name__


def hydra_error(exc: HydraException | OmegaConfBaseException) -> UsageError:
    """Hydra's multi-line message as one line: its first line, its cause's, and the options of a
    group (config schemas left out)."""
    parts = [_first_line(exc)]
    if isinstance(exc, OverrideParseException):
        parts.insert(0, f"cannot parse override {exc.override!r}")
    if exc.__cause__ is not None:
        parts.append(_first_line(exc.__cause__))
    message = ": ".join(parts)
    options = getattr(exc, "options", None)
    if options:
        message += f"; available: {', '.join(o for o in options if not o.endswith('_schema'))}"
    return UsageError(message)
