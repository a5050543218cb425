"""Built-in callbacks: stream to stdout, a JSONL record, a progress bar, and throughput metrics."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import Callback


class StdoutCallback(Callback):
    """Print text as it is generated."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def on_text(self, piece: str) -> None:
        out = self.stream or sys.stdout
        out.write(piece)
        out.flush()

    def on_end(self, result: Any) -> None:
        (self.stream or sys.stdout).write("\n")


class MetricsCallback(Callback):
    """Time to first token, prefill and decode throughput.

    Prefill speed is approximated as prompt tokens / time to first token (which also holds one
    sampling step, well under 1% of it). Decode speed counts tokens after the first. The numbers
    are stored in ``self.metrics`` and in ``result.metrics``.
    """

    name = "metrics"

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_start(self, run: Any) -> None:
        self._prompt_tokens, self._count = run.prompt_tokens, 0
        self._start = time.perf_counter()
        self._first = self._start

    def on_token(self, token: int) -> None:
        self._count += 1
        if self._count == 1:
            self._first = time.perf_counter()

    def on_end(self, result: Any) -> None:
        end = time.perf_counter()
        ttft = self._first - self._start if self._count else end - self._start
        self.metrics = {
            "prompt_tokens": self._prompt_tokens,
            "generated_tokens": self._count,
            "time_to_first_token_s": ttft,
            "prefill_tok_per_s": self._prompt_tokens / ttft if ttft > 0 else 0.0,
            "decode_tok_per_s": (self._count - 1) / (end - self._first) if self._count > 1 and end > self._first else 0.0,
            "total_s": end - self._start,
        }
        result.metrics.update(self.metrics)


class JsonlCallback(Callback):
    """Append a JSON line per event (start, token with its text, end) to ``path``.

    Appends, never truncates: an existing record is kept.
    """

    name = "jsonl"

    def __init__(self, path: str | Path = "generation.jsonl") -> None:
        self.path = Path(path)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_start(self, run: Any) -> None:
        self._file = self.path.open("a", encoding="utf-8")
        self._write({"event": "start", **asdict(run)})

    def on_token(self, token: int) -> None:
        self._write({"event": "token", "id": token})

    def on_text(self, piece: str) -> None:
        self._write({"event": "text", "text": piece})

    def on_end(self, result: Any) -> None:
        self._write({"event": "end", "text": result.text, "tokens": result.tokens, "stop_reason": result.stop_reason, "stop": result.stop, "metrics": result.metrics})
        self._file.close()


class ProgressCallback(Callback):
    """tqdm progress bars on stderr: prefill of a prompt longer than one chunk (long prompts take
    minutes), then the generated tokens (``decode=False``: the prefill bar only)."""

    name = "progress"

    def __init__(self, decode: bool = True) -> None:
        self.decode = decode
        self._prefill = self._bar = None

    def on_start(self, run: Any) -> None:
        self._prefill = self._bar = None
        self._token_count = run.token_count

    def on_prefill(self, done: int, total: int) -> None:
        if self._prefill is None and done < total:  # the first of several chunks
            self._prefill = _bar(total, "prefill")
        if self._prefill is not None:
            self._prefill.update(done - self._prefill.n)
            if done == total:
                self._prefill.close()

    def on_token(self, token: int) -> None:
        if self.decode:
            self._bar = self._bar or _bar(self._token_count, "generate")
            self._bar.update(1)

    def on_end(self, result: Any) -> None:
        for bar in (self._prefill, self._bar):
            if bar is not None:
                bar.close()


def _bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)


@hookimpl
def register_callbacks(register) -> None:
    for cls in (StdoutCallback, MetricsCallback, JsonlCallback, ProgressCallback):
        register(cls)
