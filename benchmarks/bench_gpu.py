"""GPU speed table: decode and prefill tokens/s of rwkvkit's backends on random 0.1B-, 1.5B- and
2.9B-shaped RWKV-7 models, plus the `rwkv` package (RWKV_CUDA_ON=1) as the reference when it is
installed; each decode rate also as a fraction of the device's measured copy bandwidth.

    python benchmarks/bench_gpu.py [--json out.json]        # on a GPU machine (gpu_check.sh runs it)
    python benchmarks/bench_gpu.py --device cpu --tiny      # the same code path on a CPU, in seconds

First the device's copy bandwidth (a device-to-device copy of 2 GiB, bytes read + written per
second) and the matvec kernel's bandwidth per decode matrix of the 0.1B, 1.5B and 2.9B shapes, per
thread layout (``team``) and against cuBLAS, for tuning matvec.cu's rule. Then the rows in order
of need, so a time budget cuts the extras first: the `cuda` backend's fp16, bf16 and fp16i8 rows of
every shape, the reference, then the engine rates, the torch backend and streaming. A decode
row's ``% copy`` is the weights one token reads (all but the embedding) times tokens/s over the
copy bandwidth: decoding at batch 1 cannot beat ~100%.

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
import math
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
import torch.nn.functional as F

from rwkvkit import kernels_build
from rwkvkit.checkpoint import Checkpoint
from rwkvkit.cuda_graphs import GraphedDecoder
from rwkvkit.engine import Engine, Request
from rwkvkit.errors import RwkvkitError
from rwkvkit.model import Model
from rwkvkit.plugins.samplers import GreedySampler
from rwkvkit.quant import quantize_per_channel
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.strategy import parse_strategy
from rwkvkit.testing import make_spec, random_checkpoint

GPU_SHAPES = {"0.1B": (12, 768, 65536), "1.5B": (24, 2048, 65536), "2.9B": (32, 2560, 65536)}  # n_layer, n_embd, vocab
GPU_ENGINES = [("cuda", "cuda fp16"), ("cuda", "cuda bf16"), ("cuda", "cuda fp16i8")]  # every shape, first
EXTRA_ENGINES = [
    ("torch", "cuda fp16"),
    ("cuda", "cuda fp16i8 *0+"),  # every layer streamed from pinned CPU RAM: bound by the host link
]
ENGINE_STRATEGY = "cuda fp16"  # the `cuda` row whose engine rates (B=1, B=64) are measured, after the reference
TARGETS = (
    "targets (issue 20, H100-class card): 1.5B cuda fp16 graph decode >= 650 tok/s and >= 70% of the copy bandwidth (any card);\n"
    "cuda fp16i8 >= 1.6x cuda fp16; 0.1B graph decode >= 2500; engine B=1 >= 90% of graph; cuda fp16 engine B=64 >= 10000 (1.5B)"
)
ENGINE_BATCH = 64
RUN_SECONDS = 5.0  # stop repeating a measurement after this long (one run always happens)
COPY_BYTES = 2 << 30  # the copy-bandwidth measurement's buffer (>= 1 GiB: far past any L2)
L2_FLUSH_BYTES = 512 << 20  # matvec table: weight copies cycled per graph so every call reads DRAM, not L2
MATVEC_TEAMS = ("rule", 8, 32, 128)  # matvec's own choice (team 0), then each thread layout forced
MATVEC_SHAPES = {"0.1B": 768, "1.5B": 2048, "2.9B": 2560}  # n_embd of the shapes whose decode matrices are timed
SEED_VOCAB = 1024  # quick_checkpoint draws this many vocabulary rows and repeats them


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
    read_bytes: int | None = None  # weight bytes one decoded token reads (all but the embedding)
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


def quick_checkpoint(n_layer: int, n_embd: int, vocab: int) -> dict[str, torch.Tensor]:
    """A random fp16 checkpoint of this shape in seconds: drawing 3B normal numbers on a CPU takes
    minutes, so ``random_checkpoint`` draws 2 layers and SEED_VOCAB vocabulary rows, layer 1 stands
    for layers 2.. and the rows are repeated up to ``vocab``, every copy rolled along its last
    dimension by its index: no two layers or vocabulary blocks are equal (identical layers would add
    one direction to the residual stream over and over). Speed depends on the shapes, not the values."""
    if n_layer <= 2 or vocab % SEED_VOCAB:
        return random_checkpoint(make_spec(n_layer, n_embd, vocab), seed=0, dtype=torch.float16)
    seed = random_checkpoint(make_spec(2, n_embd, SEED_VOCAB), seed=0, dtype=torch.float16)
    tensors = {}
    for key, t in seed.items():
        if key.startswith("blocks.1."):
            tensors |= {f"blocks.{i}.{key[9:]}": torch.roll(t, i - 1, dims=-1) for i in range(1, n_layer)}
        elif key in ("emb.weight", "head.weight"):
            tensors[key] = torch.cat([torch.roll(t, j, dims=-1) for j in range(vocab // SEED_VOCAB)])
        else:
            tensors[key] = t
    return tensors


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes read + written per second by a device-to-device copy of COPY_BYTES: the median of ten
    after a warm-up, timed with CUDA events. None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.zeros(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * COPY_BYTES / statistics.median(times)


def graphed_seconds(calls: list[Callable[[], object]], device: torch.device) -> float:
    """Seconds per call of ``calls`` captured back to back in one CUDA graph (as a graphed decode
    step launches them: no Python or launch overhead between kernels), median of five replays."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS handles, first-call allocations)
        for call in calls[:2]:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(calls)


def matvec_table(device: torch.device, copy_bw: float) -> list[dict]:
    """GB/s (weight bytes / time) of one batch-1 product per decode matrix of the MATVEC_SHAPES, fp16
    and int8 weights, for matvec's own choice of thread layout and each layout forced, and cuBLAS
    (F.linear) for fp16: what matvec.cu's rule is tuned from. Each call reads another copy of the
    weight, so the timing is DRAM's, not L2's."""
    ops, rows = kernels_build.ops(), []
    no_scale = torch.empty(0, device=device)
    for shape, C in MATVEC_SHAPES.items():
        for matrix, (n_out, n_in) in {"[C, C]": (C, C), "FFN key [4C, C]": (4 * C, C), "FFN value [C, 4C]": (C, 4 * C), "head [V, C]": (65536, C)}.items():
            for fmt in ("fp16", "int8"):
                nbytes = n_out * n_in * (1 if fmt == "int8" else 2) + (4 * n_out if fmt == "int8" else 0)
                copies = max(2, math.ceil(L2_FLUSH_BYTES / nbytes))
                w = torch.randn(n_out, n_in, device=device, dtype=torch.float16)
                if fmt == "int8":
                    q = quantize_per_channel(w)
                    weights = [(q.q.clone(), q.scale.clone()) for _ in range(copies)]
                else:
                    weights = [(w.clone(), no_scale) for _ in range(copies)]
                del w
                x = torch.randn(1, n_in, device=device, dtype=torch.float16)
                calls = max(32, copies)
                row = {"shape": shape, "matrix": matrix, "format": fmt, "MB": nbytes / 1e6}
                for team in MATVEC_TEAMS:
                    seconds = graphed_seconds(
                        [functools.partial(ops.matvec, [x], [weights[i % copies][0]], [weights[i % copies][1]], [0], None, 0 if team == "rule" else team) for i in range(calls)],
                        device,
                    )
                    row[f"team {team}"] = nbytes / seconds
                if fmt == "fp16":
                    row["cuBLAS"] = nbytes / graphed_seconds([functools.partial(F.linear, x, weights[i % copies][0]) for i in range(calls)], device)
                rows.append(row)
                del weights
                torch.cuda.empty_cache()
    columns = [f"team {t}" for t in MATVEC_TEAMS] + ["cuBLAS"]
    print(f"\nmatvec, batch 1, GB/s and % of the copy bandwidth ({copy_bw / 1e9:,.0f} GB/s):")
    print(f"{'shape':<5} {'matrix':<18} {'format':<6} {'MB':>6}  " + "  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        cells = [f"{row[c] / 1e9:7,.0f} {100 * row[c] / copy_bw:4.0f}%" if c in row else f"{'-':>14}" for c in columns]
        print(f"{row['shape']:<5} {row['matrix']:<18} {row['format']:<6} {row['MB']:6.0f}  " + "  ".join(f"{c:>14}" for c in cells))
    return rows


def bench_rwkvkit(model: Model, row: Row, device: torch.device, args: argparse.Namespace) -> None:
    """Eager decode, prefill and (on CUDA) graphed decode of ``model``; the engine rates come later."""
    row.read_bytes = model.weight_bytes() - model.emb.nbytes
    row.decode, row.prefill, state = eager_rates(model.forward, model.spec.vocab_size, device, args)
    if device.type == "cuda":
        decoder = GraphedDecoder(model, state=state)
        row.graph = decode_rate(decoder.step, _ids(args.decode_tokens, model.spec.vocab_size, 3), device)
        del decoder


def bench_engine(model: Model, row: Row, device: torch.device, args: argparse.Namespace) -> None:
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


class Runner:
    """Runs the rows in order of need against one time budget; keeps the random checkpoints (host
    memory) so later phases reuse them. A row that cannot run says why in its note."""

    def __init__(self, shapes: dict, device: torch.device, args: argparse.Namespace) -> None:
        self.shapes, self.device, self.args = shapes, device, args
        self.start = time.perf_counter()
        self.checkpoints: dict[str, Checkpoint] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def checkpoint(self, name: str) -> Checkpoint:
        if name not in self.checkpoints:
            self.checkpoints[name] = Checkpoint(Path(f"random-{name}"), make_spec(*self.shapes[name]), quick_checkpoint(*self.shapes[name]))
        return self.checkpoints[name]

    def run(self, name: str, row: Row, backend: str, measure: Callable[[Model, Row, torch.device, argparse.Namespace], None]) -> None:
        if self.elapsed() > self.args.budget_s:
            skipped = "skipped: time budget" if measure is bench_rwkvkit else f"{measure.__name__} skipped: time budget"
            row.note = f"{row.note}; {skipped}" if row.note else skipped
            return
        print(f"[{self.elapsed():5.0f}s] {name} {row.engine} {row.strategy} {measure.__name__}", flush=True)
        model = None
        try:
            model = Model(self.checkpoint(name), parse_strategy(row.strategy, self.shapes[name][0], backend))
            measure(model, row, self.device, self.args)
        except RwkvkitError as exc:  # e.g. no kernels here: the reason is the note
            row.note = str(exc)[:160]
        except Exception as exc:  # one broken row must not cost the whole table
            traceback.print_exc()
            row.note = f"{type(exc).__name__}: {exc}"[:160]
        del model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def reference_rows(runner: Runner) -> list[Row]:
    """The `rwkv` package on the same checkpoints: its first use builds its own CUDA extension
    (gpu_check.sh builds it ahead, in the background)."""
    args, rows = runner.args, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in runner.shapes:
            row = Row(name, "rwkv pip (reference)", "cuda fp16" if runner.device.type == "cuda" else "cpu fp32")
            rows.append(row)
            left = args.budget_s - runner.elapsed()
            if importlib.util.find_spec("rwkv") is None:
                row.note = "rwkv package not installed (gpu_check.sh --wheels fetches it into .whl/)"
            elif left < 30 or name not in runner.checkpoints:
                row.note = "skipped: time budget"
            else:
                print(f"[{runner.elapsed():5.0f}s] {name} {row.engine}", flush=True)
                path = Path(tmp) / f"{name}.pth"
                torch.save(runner.checkpoints[name].tensors, path)
                try:
                    bench_reference(path.with_suffix(""), row, args, timeout=left)
                except Exception as exc:
                    row.note = f"{type(exc).__name__}: {exc}"[:160]
                path.unlink()
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _share(row: Row, rate: float | None, copy_bw: float | None) -> str:
    """A decode rate's weight traffic as a share of the copy bandwidth."""
    return "-" if None in (rate, row.read_bytes, copy_bw) else f"{100 * rate * row.read_bytes / copy_bw:.0f}%"


def print_table(rows: list[Row], prefill: list[int], copy_bw: float | None) -> None:
    header = ["model", "engine", "strategy", "MB/token", "decode tok/s", "% copy", "graph tok/s", "% copy", "engine tok/s",
              f"engine B={ENGINE_BATCH}", *(f"prefill {n}" for n in prefill), "note"]  # fmt: skip
    cells = [
        [r.model, r.engine, r.strategy, "-" if r.read_bytes is None else f"{r.read_bytes / 1e6:,.0f}", _fmt(r.decode), _share(r, r.decode, copy_bw),
         _fmt(r.graph), _share(r, r.graph, copy_bw), _fmt(r.engine_single), _fmt(r.engine_batch), *(_fmt(r.prefill.get(n)) for n in prefill), r.note]
        for r in rows
    ]  # fmt: skip
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
    parser.add_argument("--budget-s", type=float, default=300, help="skip the rows that would start after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="only the `cuda` backend's rows: no matvec table, reference, engine rates or extras")
    parser.add_argument("--reference", help=argparse.SUPPRESS)  # internal: run the `rwkv` package on this model
    parser.add_argument("--reference-strategy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        reference_worker(args)
        return 0

    device = torch.device(args.device)
    shapes = {"tiny": (2, 128, 1024)} if args.tiny else {k: v for k, v in GPU_SHAPES.items() if not args.models or k in args.models}
    engines, extras = (GPU_ENGINES, EXTRA_ENGINES) if device.type == "cuda" else ([("torch", "cpu fp32")], [])
    if args.tiny:
        args.decode_tokens, args.prefill = min(args.decode_tokens, 8), [16, 64]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"rwkvkit GPU benchmark on {where}, torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    runner = Runner(shapes, device, args)
    copy_bw = copy_bandwidth(device)
    print(f"device-to-device copy of {COPY_BYTES >> 30} GiB: " + ("-" if copy_bw is None else f"{copy_bw / 1e9:,.0f} GB/s (read + write)"), flush=True)
    matvec_rows: list[dict] = []
    if device.type == "cuda" and not args.quick and copy_bw is not None:
        try:
            matvec_rows = matvec_table(device, copy_bw)
        except RwkvkitError as exc:  # no kernels here: the model rows will say so too
            print(f"matvec table: {exc}")
        except Exception:  # a broken table must not cost the model rows
            traceback.print_exc()
        torch.cuda.empty_cache()

    rows = {(name, backend, strategy): Row(name, f"rwkvkit {backend}", strategy) for name in shapes for backend, strategy in engines}
    for (name, backend, _), row in rows.items():
        runner.run(name, row, backend, bench_rwkvkit)
    table = list(rows.values())
    if not args.quick:
        table += reference_rows(runner)
        engine_key = ("cuda", ENGINE_STRATEGY) if device.type == "cuda" else engines[0]
        for name in shapes:
            runner.run(name, rows[(name, *engine_key)], engine_key[0], bench_engine)
        for name in shapes:
            for backend, strategy in extras:
                row = Row(name, f"rwkvkit {backend}", strategy)
                runner.run(name, row, backend, bench_rwkvkit)
                table.append(row)
    print(f"\n{TARGETS}")
    print_table(table, args.prefill, copy_bw)
    print(f"total {runner.elapsed():.0f} s")
    if args.json:
        result = {"device": where, "torch": torch.__version__, "copy_bandwidth": copy_bw, "matvec": matvec_rows, "rows": [asdict(r) for r in table]}
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
