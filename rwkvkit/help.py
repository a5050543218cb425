"""``rwkvkit run --help``: Hydra's help page, with every config key's type, default and meaning
taken from the structured configs (each field's ``metadata["help"]``), so the page cannot drift
from the schema."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

FREE_TEXT_RULE = """\
Values of prompt, prompt_file, model.path, model.tokenizer, model.state and strategy.spec are taken literally
(everything after the first '='), so only the shell's quoting applies:
  rwkvkit run prompt="Hello, world!" strategy.spec="cpu fp32i8 *1 -> cpu fp32"
With -m, commas separate the values to sweep (-m strategy.spec="cpu fp32,cpu bf16"); a value
already in Hydra's quotes ("prompt='a, b'") is read by Hydra as is. --prompt TEXT is always one
prompt; with no prompt given, text piped on stdin is the prompt (echo text | rwkvkit run).
Other keys follow Hydra's override grammar (https://hydra.cc/docs/advanced/override_grammar/basic)."""


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return re.sub(r"^Optional\[(.*)\]$", r"\1 or null", text)


def _default(f: Any) -> str:
    if f.default_factory is not MISSING:
        return repr(f.default_factory())
    if f.default is MISSING or f.default == "???":
        return "(set by the option)"
    return "null" if f.default is None else repr(f.default)


def key_rows(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every leaf key of a config dataclass, nested keys dotted."""
    rows = []
    for f in fields(schema):
        nested = f.default_factory() if f.default_factory is not MISSING else None
        if is_dataclass(nested):
            rows += key_rows(type(nested), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, _type_name(f.type), _default(f), f.metadata.get("help", "")))
    return rows


def help_node(schema: type, app: str = "rwkvkit run", about: str | None = None) -> dict[str, str]:
    """The ``hydra/help`` config for the app whose config is ``schema`` (Hydra fills in the
    ``$``-placeholders with string.Template, so other ``$`` are doubled); ``about`` says what an
    app other than ``rwkvkit run`` does."""
    rows = key_rows(schema)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    table = "\n".join(f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {m}" for k, t, d, m in rows).replace("$", "$$")
    if about is not None:
        text = f"""\
{app}: {about.replace("$", "$$")}

usage: {app} [group=option ...] [key=value ...] [--cfg job] [--config-dir DIR]

== Config groups (group=option) ==
$APP_CONFIG_GROUPS
== Keys (key=value): type, default, meaning ==
{table}

== Config ==
$CONFIG
"""
        return {"app_name": app, "header": "", "footer": "", "template": text}
    text = f"""\
rwkvkit run: generate text with an RWKV-7 model from composed Hydra configs.

usage: rwkvkit run [group=option ...] [key=value ...] [--prompt TEXT] [-m] [--cfg job] [--config-dir DIR]

Each run writes config.yaml, run.json, output.txt (a prompts_file run: results.jsonl) and metrics.json
into its run directory (hydra.run.dir, default outputs/DATE/TIME) and ends by naming it on stderr.

== Config groups (group=option) ==
$APP_CONFIG_GROUPS
== Keys (key=value): type, default, meaning ==
{table}
Group keys (model.*, strategy.*, sampling.*, callbacks.*) are set by the chosen option; the
config below shows the values this command line gives.

== Quoting ==
{FREE_TEXT_RULE.replace("$", "$$")}

== Config ==
$CONFIG
Hydra's own options: rwkvkit run --hydra-help
"""
    return {"app_name": "rwkvkit run", "header": "", "footer": "", "template": text}
