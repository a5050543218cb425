"""GPU speed table: decode and prefill tokens/s of rwkvkit's backends on random 0.1B- and 1.5B-shaped
RWKV-7 models, plus the `rwkv` package (RWKV_CUDA_ON=1) as the reference when it is installed.

    python benchmarks/bench_gpu.py [--json out.json]        # on a GPU machine (gpu_check.sh runs it)
    python benchmarks/bench_gpu.py --device cpu --tiny      # the same code path on a CPU, in seconds

Decode is batch 1, one token per call after a short prompt: ``eager`` calls ``Model.forward``,
``graph`` replays a ``GraphedDecoder``; ``engine`` is greedy generation through the batching engine
(what ``rwkvkit run`` and ``PIPELINE.generate`` use: CUDA graphs by default on one GPU) at batch 1,
and ``engine B=64`` its aggregate over 64 sequences. Prefill is one ``forward`` over a fresh prompt. Every number
is tokens / wall-clock seconds with the device synchronised, the median of up to three runs after
a warm-up. A row that cannot run says why in its note instead of stopping the table.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rwkvkit.checkpoint import Checkpoint
from rwkvkit.cuda_graphs import GraphedDecoder
from rwkvkit.engine import Engine, Request
from rwkvkit.errors import RwkvkitError
from rwkvkit.model import Model
from rwkvkit.plugins.samplers import GreedySampler
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.strategy import parse_strategy
from rwkvkit.testing import make_spec, random_checkpoint

GPU_SHAPES = {"0.1B": (12, 768, 65536), "1.5B": (24, 2048, 65536)}  # n_layer, n_embd, vocab
GPU_ENGINES = [
    ("cuda", "cuda fp16"),
    ("cuda", "cuda bf16"),
    ("cuda", "cuda fp16i8"),
    ("torch", "cuda fp16"),
    ("cuda", "cuda fp16i8 *0+"),  # every layer streamed from pinned CPU RAM: bound by the host link
]
TARGETS = (
    "targets (H100): 1.5B fp16 decode >= 600 tok/s; 0.1B graph decode >= 2000; 1.5B prefill 4096 >= 20000; fp16i8 decode > fp16;\n"
    "engine B=1 >= 90% of graph; cuda fp16 engine B=64 >= 10000 (1.5B), >= 40000 (0.1B)"
)
ENGINE_BATCH = 64
RUN_SECONDS = 5.0  # stop repeating a measurement after this long (one run always happens)


@dataclass
class Row:
    model: str
    engine: str
    strategy: str
    decode: float | None = None
    graph: float | None = None
    engine_single: float | None = None
    engine_batch: float | None = None
    prefill: dict[int, float] = field(default_factory=dict)
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tokens_per_second(run: Callable[[], object], n_tokens: int, device: torch.device) -> float:
    """Median tokens/s over up to three timed runs (fewer when a run is slow)."""
    times: list[float] = []
    while len(times) < 3 and sum(times) < RUN_SECONDS:
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return n_tokens / statistics.median(times)


def decode_rate(step: Callable[[int], object], ids: list[int], device: torch.device) -> float:
    for t in ids[:8]:  # warm-up: first-call allocations and lazy initialisation
        step(t)
    return tokens_per_second(lambda: [step(t) for t in ids], len(ids), device)


def eager_rates(forward: Callable, vocab: int, device: torch.device, args: argparse.Namespace) -> tuple[float, dict[int, float], object]:
    """Decode tokens/s (batch 1, one token per call after a 16-token prompt) and prefill tokens/s
    of a ChatRWKV-style ``forward(tokens, state) -> (logits, state)``; also returns the prompt's state."""
    _, prompt_state = forward(_ids(16, vocab, 1), None)
    state = [prompt_state]

    def step(token: int) -> None:
        _, state[0] = forward([token], state[0])

    decode = decode_rate(step, _ids(args.decode_tokens, vocab, 2), device)
    forward(_ids(64, vocab, 4), None)  # warm-up at prefill shapes
    prefill = {n: tokens_per_second(functools.partial(forward, _ids(n, vocab, 5), None), n, device) for n in args.prefill}
    return decode, prefill, prompt_state


def engine_rate(model: Model, batch: int, n_tokens: int, device: torch.device) -> float | None:
    """Aggregate decode tokens/s of ``batch`` greedy sequences (16-token prompts) through the
    engine: the time of prompts + ``n_tokens`` each, less the time of the prompts alone (None
    when noise swallows the difference)."""
    tokenizer = resolve_tokenizer("rwkv_vocab_v20230424")

    def run(count: int) -> None:
        requests = [Request(_ids(16, model.spec.vocab_size, 10 + i), count, GreedySampler(), seed=i) for i in range(batch)]
        Engine(model, tokenizer, max_batch=batch).generate(requests)

    run(8)  # warm-up: captures the batch's graph
    prompts_only = 1 / tokens_per_second(lambda: run(0), 1, device)
    whole = 1 / tokens_per_second(lambda: run(n_tokens), 1, device)
    return batch * n_tokens / (whole - prompts_only) if whole > prompts_only else None


def bench_rwkvkit(model: Model, row: Row, device: torch.device, args: argparse.Namespace) -> None:
    row.decode, row.prefill, state = eager_rates(model.forward, model.spec.vocab_size, device, args)
    if device.type == "cuda":
        decoder = GraphedDecoder(model, state=state)
        row.graph = decode_rate(decoder.step, _ids(args.decode_tokens, model.spec.vocab_size, 3), device)
        del decoder
    row.engine_single = engine_rate(model, 1, args.decode_tokens, device)
    row.engine_batch = engine_rate(model, 2 if args.tiny else ENGINE_BATCH, args.decode_tokens, device)


def reference_worker(args: argparse.Namespace) -> None:
    """In its own process (the `rwkv` package sets process-wide state at import): print one JSON line."""
    device = torch.device(args.reference_strategy.split()[0])
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="1" if device.type == "cuda" else "0")
    from rwkv.model import RWKV as Reference

    model = Reference(args.reference, args.reference_strategy)
    decode, prefill, _ = eager_rates(model.forward, model.args.vocab_size, device, args)
    print(json.dumps({"decode": decode, "prefill": prefill}))


def bench_reference(path: Path, row: Row, args: argparse.Namespace, timeout: float) -> None:
    command = [sys.executable, __file__, "--reference", str(path), "--reference-strategy", row.strategy,
               "--decode-tokens", str(args.decode_tokens), "--prefill", *map(str, args.prefill)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}")
    result = json.loads(lines[-1])
    row.decode, row.prefill = result["decode"], {int(n): v for n, v in result["prefill"].items()}


def rwkvkit_rows(
    shapes: dict, engines: list, device: torch.device, args: argparse.Namespace, elapsed: Callable[[], float]
) -> tuple[list[Row], dict[str, Checkpoint]]:
    """One row per model shape and engine; also returns the random checkpoints for the reference."""
    rows: list[Row] = []
    checkpoints: dict[str, Checkpoint] = {}
    for name, (n_layer, n_embd, vocab) in shapes.items():
        model_rows = [Row(name, f"rwkvkit {backend}", strategy) for backend, strategy in engines]
        rows += model_rows
        if elapsed() > args.budget_s:
            continue
        spec = make_spec(n_layer, n_embd, vocab)
        checkpoints[name] = checkpoint = Checkpoint(Path(f"random-{name}"), spec, random_checkpoint(spec, seed=0, dtype=torch.float16))
        for row, (backend, strategy) in zip(model_rows, engines):
            if elapsed() > args.budget_s:
                break
            print(f"[{elapsed():5.0f}s] {name} {row.engine} {strategy}", flush=True)
            try:
                bench_rwkvkit(Model(checkpoint, parse_strategy(strategy, n_layer, backend)), row, device, args)
            except RwkvkitError as exc:  # e.g. no kernels here: the reason is the note
                row.note = str(exc)[:160]
            except Exception as exc:  # one broken row must not cost the whole table
                traceback.print_exc()
                row.note = f"{type(exc).__name__}: {exc}"[:160]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        if row.decode is None and not row.note:
            row.note = "skipped: time budget"
    return rows, checkpoints


def reference_rows(checkpoints: dict[str, Checkpoint], device: torch.device, args: argparse.Namespace, elapsed: Callable[[], float]) -> list[Row]:
    """The `rwkv` package on the same checkpoints, last: its first use builds its own CUDA extension."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkpoint in checkpoints.items():
            row = Row(name, "rwkv pip (reference)", "cuda fp16" if device.type == "cuda" else "cpu fp32")
            rows.append(row)
            left = args.budget_s - elapsed()
            if importlib.util.find_spec("rwkv") is None:
                row.note = "rwkv package not installed"
            elif left < 30:
                row.note = "skipped: time budget"
            else:
                print(f"[{elapsed():5.0f}s] {name} {row.engine}", flush=True)
                path = Path(tmp) / f"{name}.pth"
                torch.save(checkpoint.tensors, path)
                try:
                    bench_reference(path.with_suffix(""), row, args, timeout=left)
                except Exception as exc:
                    row.note = f"{type(exc).__name__}: {exc}"[:160]
                path.unlink()
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def print_table(rows: list[Row], prefill: list[int]) -> None:
    header = ["model", "engine", "strategy", "decode tok/s", "graph tok/s", "engine tok/s", f"engine B={ENGINE_BATCH}", *(f"prefill {n}" for n in prefill), "note"]
    cells = [
        [r.model, r.engine, r.strategy, _fmt(r.decode), _fmt(r.graph), _fmt(r.engine_single), _fmt(r.engine_batch), *(_fmt(r.prefill.get(n)) for n in prefill), r.note]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells)]
    for line in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short runs: checks the script, measures nothing useful")
    parser.add_argument("--models", nargs="*", help=f"subset of {list(GPU_SHAPES)}")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 4096])
    parser.add_argument("--budget-s", type=float, default=200, help="skip the rows that would start after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="only the resident `cuda` backend rows: no torch backend, streaming or reference")
    parser.add_argument("--reference", help=argparse.SUPPRESS)  # internal: run the `rwkv` package on this model
    parser.add_argument("--reference-strategy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        reference_worker(args)
        return 0

    start, device = time.perf_counter(), torch.device(args.device)
    shapes = {"tiny": (2, 128, 1024)} if args.tiny else {k: v for k, v in GPU_SHAPES.items() if not args.models or k in args.models}
    engines = [("torch", "cpu fp32"), *GPU_ENGINES[:1]] if device.type == "cpu" else GPU_ENGINES
    if args.quick:
        engines = [(backend, strategy) for backend, strategy in engines if backend == "cuda" and "+" not in strategy]
    if args.tiny:
        args.decode_tokens, args.prefill = min(args.decode_tokens, 8), [16, 64]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"rwkvkit GPU benchmark on {where}, torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)

    def elapsed() -> float:
        return time.perf_counter() - start

    rows, checkpoints = rwkvkit_rows(shapes, engines, device, args, elapsed)
    if not args.quick:
        rows += reference_rows(checkpoints, device, args, elapsed)
    print(f"\n{TARGETS}")
    print_table(rows, args.prefill)
    print(f"total {elapsed():.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
