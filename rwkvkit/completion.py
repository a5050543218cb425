"""Shell completion for ``rwkvkit run`` through Hydra's completion plugins.

Hydra's scripts are written for a program whose first word is the Hydra app: the installed script
registers the program's name and asks ``PROGRAM -sc query=SHELL`` with the typed line in
``COMP_LINE``. For ``rwkvkit run`` the script must register ``rwkvkit`` (not ``rwkvkit run``),
and a query is answered by Hydra with the ``run`` word taken out of the line; before ``run`` is
typed the subcommands are offered.
"""

from __future__ import annotations

import os
import re

COMPLETION_FLAGS = ("-sc", "--shell-completion")
PROGRAM = "rwkvkit"
_RUN_LINE = re.compile(r"^(\s*\S+)\s+run(\s|$)")


def is_query(argv: list[str]) -> bool:
    """``rwkvkit -sc query=SHELL``: the installed completion script asking for candidates."""
    return len(argv) == 2 and argv[0] in COMPLETION_FLAGS and argv[1].startswith("query=")


def run_line(line: str) -> str | None:
    """The typed line as Hydra's query expects it (``rwkvkit run a=1 b`` -> ``rwkvkit a=1 b``);
    None when the line is not a ``rwkvkit run`` command."""
    match = _RUN_LINE.match(line)
    return None if match is None else match.group(1) + line[match.end(1) + len(" run") :]


def subcommands(line: str, commands: list[str], shell: str) -> str:
    """Candidates for the word after ``rwkvkit``: the subcommands it may begin; nothing later
    (the shell then completes file names, e.g. for ``rwkvkit info``)."""
    words = line.split()
    typing_first = len(words) == 1 and line.endswith(" ") or len(words) == 2 and not line.endswith(" ")
    if not typing_first:
        return ""
    prefix = "" if len(words) == 1 else words[1]
    return ("\n" if shell == "fish" else " ").join(c for c in commands if c.startswith(prefix))


def prepare_query() -> bool:
    """Rewrite ``COMP_LINE`` for Hydra's query; False when the line is not ``rwkvkit run ...``."""
    line = run_line(os.environ.get("COMP_LINE", ""))
    if line is None:
        return False
    os.environ["COMP_LINE"] = line
    return True
