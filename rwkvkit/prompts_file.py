"""``rwkvkit run prompts_file=X.jsonl``: every prompt of a file in one batched engine run.

The file is UTF-8 JSON Lines, one prompt per line::

    {"prompt": "Once upon a time", "seed": 1}
    {"prompt": "The capital of France is", "token_count": 20, "sampling": {"name": "greedy"}}
    "A line that is a JSON string is a prompt with the run's settings"
    {"prompt": "System: be brief.\n\nUser: hi", "cache_prefix": "System: be brief.\n\n"}
    {"prompt": "A user as JSON:", "constraint": {"json_schema": {"type": "object"}}}

``prompt`` (text, required); ``seed`` and ``token_count`` replace the run's ``seed`` and
``token_count``; ``sampling`` overrides keys of the run's ``sampling`` config for this prompt
(typed like the command line's ``sampling.*``). ``cache_prefix``: the beginning of the prompt
whose state the prompt cache (``engine.cache_mb``) keeps for the prompts that follow, e.g. a shared
system prompt; it must end on a token boundary of the prompt. ``constraint``: structured output for
this prompt, as ``PIPELINE.generate(constraint=...)`` takes it: ``{"json_schema": schema}`` (an
object or JSON text), ``{"regex": pattern}`` or ``{"grammar": lark_or_gbnf_text}``; the sources are
inline (the run's ``constraint.*`` keys name files), ``null`` means none, and a line without the key
gets the run's ``constraint.*``. Blank lines are skipped. A prompt without its own
seed gets the run's: its result is then exactly what ``rwkvkit run prompt=... seed=...`` (and
``PIPELINE.generate``) gives for it alone. Everything is checked before the model loads; a bad line
is reported with the file, its line number and what was expected.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rwkvkit.config import make_penalties, make_sampler, make_stops
from rwkvkit.constraints import ConstraintMaker, constraint_maker, constraint_spec
from rwkvkit.engine import GenerationResult, Handle
from rwkvkit.errors import ConstraintError, InputError, RwkvkitError
from rwkvkit.interfaces import Callback, Sampler, Tokenizer
from rwkvkit.penalties import Penalties, is_int

KEYS = ("prompt", "seed", "token_count", "sampling", "cache_prefix", "constraint")


@dataclass
class PromptLine:
    """One prompt of the file, checked, with the run's settings filled in."""

    index: int  # its position among the prompts (0-based)
    line: int  # its line in the file (1-based)
    prompt: str
    seed: int
    token_count: int
    sampling: DictConfig  # the run's sampling config with this line's overrides
    sampler: Sampler  # shared by the lines of equal sampling configs: their rows sample together
    stops: list[int | str]
    cache_prefix: str | None
    constraint: dict[str, Any] | None  # the line's own spec, else the run's (constraint.*)
    constraint_origin: str | None  # the run's keys that set it; None: the line's "constraint"

    def cache_prefix_len(self, tokenizer: Tokenizer, name: str) -> int | None:
        """The prompt's tokens in ``cache_prefix``: the engine's cut point. InputError when the
        prompt's tokens do not begin with the prefix's own (a token spans the boundary)."""
        if self.cache_prefix is None:
            return None
        head, ids = tokenizer.encode(self.cache_prefix), tokenizer.encode(self.prompt)
        if ids[: len(head)] != head:
            raise InputError(
                f"prompts_file={name}, line {self.line}: the prompt's tokens do not begin with those of its cache_prefix "
                f"(a token spans where the prefix ends): end the prefix after a newline or a space"
            )
        return len(head)

    def penalties(self, vocab_size: int) -> Penalties:
        """This prompt's own penalties (their counts are per sequence)."""
        return make_penalties(self.sampling, vocab_size)


def read_prompts(name: str, cfg: DictConfig) -> list[PromptLine]:
    """The prompts of the file ``name`` (the run's ``prompts_file``), with the run ``cfg``'s
    defaults; a RwkvkitError naming the file, and the line, for anything wrong."""
    path = Path(name).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RwkvkitError(f"prompts_file={name}: cannot read it as UTF-8 text ({exc.__class__.__name__}: {exc})") from None
    run_constraint = (constraint_spec(**cfg.constraint), " ".join(f"constraint.{k}={v}" for k, v in cfg.constraint.items() if v is not None))
    samplers: dict[str, Sampler] = {}
    prompts: list[PromptLine] = []
    for number, text in enumerate(lines, 1):
        if text.strip():
            try:
                prompts.append(_parse(text, len(prompts), number, cfg, samplers, run_constraint))
            except InputError as exc:
                raise InputError(f"prompts_file={name}, line {number}: {exc}") from None
    if not prompts:
        raise InputError(f'prompts_file={name}: no prompts in it; expected one JSON object per line, e.g. {{"prompt": "Hello", "seed": 1}}')
    return prompts


def _parse(text: str, index: int, number: int, cfg: DictConfig, samplers: dict[str, Sampler], run_constraint: tuple[dict[str, Any] | None, str | None]) -> PromptLine:
    try:
        item = json.loads(text)
    except ValueError as exc:
        raise InputError(f"not valid JSON ({exc})") from None
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict):
        raise InputError(f'expected a JSON object {{"prompt": ...}} or a JSON string, got {type(item).__name__} {text.strip():.60}')
    unknown = [k for k in item if k not in KEYS]
    if unknown:
        raise InputError(f"unknown key(s) {unknown}: expected {', '.join(KEYS)}")
    prompt, seed, token_count = item.get("prompt"), item.get("seed", cfg.seed), item.get("token_count", cfg.token_count)
    if not isinstance(prompt, str) or not prompt:
        raise InputError(f'"prompt" must be a non-empty string, got {json.dumps(prompt):.60}' if "prompt" in item else 'no "prompt": expected {"prompt": "...", ...}')
    if not is_int(seed):
        raise InputError(f'"seed" must be an integer, got {json.dumps(seed):.60}')
    if not is_int(token_count) or token_count < 0:
        raise InputError(f'"token_count" must be an integer >= 0, got {json.dumps(token_count):.60}')
    prefix = item.get("cache_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not prefix or not prompt.startswith(prefix)):
        raise InputError(f'"cache_prefix" must be a non-empty string the prompt begins with, got {json.dumps(prefix):.60}')
    constraint, origin = (item["constraint"], None) if "constraint" in item else run_constraint
    if constraint is not None and (not isinstance(constraint, dict) or len(constraint) != 1):
        raise InputError(f'"constraint" must be an object with one key, {{"json_schema": ...}}, {{"regex": ...}} or {{"grammar": ...}}, or null; got {json.dumps(constraint):.60}')
    sampling = _sampling(cfg.sampling, item.get("sampling", {}))
    key = OmegaConf.to_yaml(sampling)
    if key not in samplers:
        samplers[key] = make_sampler(sampling)
    make_penalties(sampling)  # range checks now; ids against the vocabulary once it loads
    return PromptLine(index, number, prompt, seed, token_count, sampling, samplers[key], make_stops(sampling), prefix, constraint, origin)


def constraint_makers(lines: list[PromptLine], tokenizer: Tokenizer, name: str) -> list[ConstraintMaker | None]:
    """Each line's constraint compiled for ``tokenizer`` (once per distinct source), before the
    model loads: a bad one fails naming where it was set (the file ``name`` and the line, or the
    run's ``constraint.*`` key)."""
    compiled: dict[str, ConstraintMaker] = {}
    makers: list[ConstraintMaker | None] = []
    for line in lines:
        if line.constraint is None:
            makers.append(None)
            continue
        key = json.dumps(line.constraint, sort_keys=True)
        if key not in compiled:
            try:
                compiled[key] = constraint_maker(line.constraint, tokenizer)
            except (InputError, ConstraintError) as exc:
                origin = line.constraint_origin or f'prompts_file={name}, line {line.line}: "constraint"'
                raise type(exc)(f"{origin}: {exc}") from None
        makers.append(compiled[key])
    return makers


def _sampling(base: DictConfig, overrides: Any) -> DictConfig:
    """The run's sampling config with a line's overrides, typed by the schema (SamplingConfig)."""
    if not isinstance(overrides, dict):
        raise InputError(f'"sampling" must be a JSON object of sampling options, got {json.dumps(overrides):.60}')
    try:
        return OmegaConf.merge(base, overrides)
    except OmegaConfBaseException as exc:
        raise InputError(f'"sampling": {str(exc).splitlines()[0]}') from None


class BatchProgress(Callback):
    """One tqdm bar on stderr, shared by every prompt: prompts finished, and tokens generated.
    Drawn only on a terminal (tqdm's ``disable=None``)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="prompts", unit="prompt", file=sys.stderr, disable=None)
        self.tokens, self.start = 0, time.perf_counter()

    def on_token(self, token: int) -> None:
        self.tokens += 1

    def on_end(self, result: Any) -> None:
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens} tokens, {rate:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def result_record(line: PromptLine, handle: Handle) -> dict[str, Any]:
    """results.jsonl's line for a prompt: what it generated, how it stopped, its metrics."""
    result: GenerationResult | None = handle.result
    record: dict[str, Any] = {"index": line.index, "line": line.line, "prompt": line.prompt, "seed": line.seed}
    if result is not None:
        record.update(text=result.text, tokens=result.tokens, stop_reason=result.stop_reason, stop=result.stop, metrics=result.metrics)
    if handle.error is not None:
        record["error"] = f"{type(handle.error).__name__}: {handle.error}"
    return record


def batch_metrics(records: list[dict[str, Any]], total_s: float) -> dict[str, float]:
    """The run's metrics over all prompts: totals, the aggregate speed and the mean time to first token."""
    per_prompt = [r.get("metrics", {}) for r in records]
    generated = sum(len(r.get("tokens", ())) for r in records)
    ttfts = [m["time_to_first_token_s"] for m in per_prompt if "time_to_first_token_s" in m]
    return {
        "prompts": len(records),
        "prompt_tokens": sum(m.get("prompt_tokens", 0) for m in per_prompt),
        "generated_tokens": generated,
        "total_s": total_s,
        "generated_tok_per_s": generated / total_s if total_s > 0 else 0.0,
        "mean_time_to_first_token_s": sum(ttfts) / len(ttfts) if ttfts else 0.0,
    }
