"""llama.cpp as a same-run peer for our CPU decode and prefill numbers (RWKV-7 only).

llama.cpp runs RWKV-7 from GGUF files. ``prepare`` makes them from one of our ``.pth`` checkpoints:

1. rwkvkit's own converter writes the checkpoint as a flash-linear-attention folder,
   ``<out_dir>/fla/<checkpoint stem>/`` (``RWKV7ForCausalLM``: ``config.json`` and
   ``model.safetensors``, the source's dtype kept), and the World vocabulary that rwkvkit ships
   (``rwkv_vocab_v20230424.txt``) is copied beside it: llama.cpp's ``convert_hf_to_gguf.py`` reads
   the tokenizer from that file and refuses a folder without it;
2. ``convert_hf_to_gguf.py --outtype f16`` makes the F16 GGUF, run with the Python named by
   ``RWKVKIT_LLAMA_PYTHON`` (default: this one), which needs the converter's imports: torch,
   transformers, numpy and llama.cpp's ``gguf-py``;
3. ``llama-quantize`` makes Q8_0 and Q4_0 from the F16 file.

Every file is written under a temporary name and renamed when complete, and one that exists is
kept, so a second ``prepare`` only checks. ``bench`` runs ``llama-bench -o json`` and returns the
average tokens per second of its generation (decode) and prompt (prefill) rows.

``llama_src`` is a llama.cpp source tree (``RWKVKIT_LLAMA_CPP``) built in ``build/`` with at least
the two tools used here, for example::

    cmake -S $RWKVKIT_LLAMA_CPP -B $RWKVKIT_LLAMA_CPP/build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build $RWKVKIT_LLAMA_CPP/build --target llama-bench llama-quantize -j2

Run ``python benchmarks/llamacpp_peer.py`` (``--help`` for the options) for the three formats on the
random World 0.1B checkpoint that ``bench_cpu.py`` uses (made there if missing), 2 threads by default
(``RWKVKIT_BENCH_THREADS``), 512 prompt tokens and 64 generated, as llama-bench counts them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

FORMATS = ("F16", "Q8_0", "Q4_0")
QUANTIZED = ("Q8_0", "Q4_0")
VOCAB_NAME = "rwkv_vocab_v20230424.txt"  # the name convert_hf_to_gguf.py looks for in the folder
BUILD_HINT = "build it: cmake -S {src} -B {src}/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build {src}/build --target llama-bench llama-quantize"
PYTHON_HINT = "set RWKVKIT_LLAMA_PYTHON to a Python that has the converter's imports (pip install torch==2.13.0 transformers==4.57.6 {src}/gguf-py)"
MODEL_DIR = Path(os.environ.get("RWKVKIT_BENCH_MODELS", "/tmp/rwkvkit-bench-models"))  # as bench_cpu.py
SHAPE_0_1B = {"n_layer": 12, "n_embd": 768, "vocab_size": 65536}  # bench_cpu.py's "0.1B"


class LlamaCppError(RuntimeError):
    """A llama.cpp tool or input is missing, or a step of ``prepare``/``bench`` failed (the
    message names the file or the command, with the end of its output)."""


def gguf_paths(checkpoint: Path, out_dir: Path) -> dict[str, Path]:
    """Where ``prepare`` writes each format: ``<out_dir>/<checkpoint stem>-<format>.gguf``."""
    return {fmt: Path(out_dir) / f"{Path(checkpoint).stem}-{fmt}.gguf" for fmt in FORMATS}


def prepare(checkpoint: Path, llama_src: Path, out_dir: Path) -> dict[str, Path]:
    """The GGUF files of ``checkpoint`` (an RWKV-7 model rwkvkit loads) in F16, Q8_0 and Q4_0,
    made in ``out_dir`` with ``llama_src``'s converter and ``llama-quantize`` where missing (see the
    module doc); returns ``{"F16": path, "Q8_0": path, "Q4_0": path}``."""
    checkpoint, llama_src, out_dir = Path(checkpoint), Path(llama_src), Path(out_dir)
    paths = gguf_paths(checkpoint, out_dir)
    if all(path.is_file() for path in paths.values()):
        return paths
    quantize = llama_tool(llama_src, "llama-quantize")  # every tool is checked before the slow steps
    if not paths["F16"].is_file():
        script, python = converter_script(llama_src), converter_python()
        out_dir.mkdir(parents=True, exist_ok=True)
        folder = fla_folder(checkpoint, out_dir / "fla" / checkpoint.stem)  # the converter names the model after the folder
        hint = PYTHON_HINT.format(src=llama_src)
        cmd = [python, script, folder, "--outtype", "f16", "--outfile"]
        _write_via_partial(paths["F16"], lambda tmp: _run([*cmd, tmp], f"convert_hf_to_gguf.py on {folder}", hint))
    for fmt in QUANTIZED:
        if not paths[fmt].is_file():
            _write_via_partial(paths[fmt], lambda tmp, fmt=fmt: _run([quantize, paths["F16"], tmp, fmt], f"llama-quantize {fmt} of {paths['F16']}"))
    return paths


def fla_folder(checkpoint: Path, folder: Path) -> Path:
    """``folder`` holding ``checkpoint`` in fla's RWKV-7 layout (written by ``rwkvkit convert``
    unless it has a ``config.json`` already) and the World vocabulary file."""
    if not (folder / "config.json").is_file():
        if not checkpoint.is_file():
            raise LlamaCppError(f"checkpoint {checkpoint} not found")
        from rwkvkit.formats.convert import convert

        # An existing empty folder is written as a Hugging Face folder whatever its name; a new
        # path is one only without a suffix, and "random-0.1B" has one (".1B").
        folder.mkdir(parents=True, exist_ok=True)
        convert(checkpoint, folder)
    vocab = folder / VOCAB_NAME
    if not vocab.is_file():
        from rwkvkit.plugins.rwkv_world import VOCAB_FILE

        if not VOCAB_FILE.is_file():
            raise LlamaCppError(f"rwkvkit's World vocabulary {VOCAB_FILE} not found (a broken install?)")
        _write_via_partial(vocab, lambda tmp: shutil.copyfile(VOCAB_FILE, tmp))
    return folder


def bench(llama_src: Path, gguf: Path, threads: int, n_prompt: int = 512, n_gen: int = 64, reps: int = 3) -> dict[str, float]:
    """llama-bench on ``gguf`` with ``threads`` threads, ``reps`` repetitions of a ``n_prompt``-token
    prompt and of ``n_gen`` generated tokens: ``{"decode": tok/s, "prefill": tok/s}`` (avg_ts)."""
    check_counts(threads=threads, n_prompt=n_prompt, n_gen=n_gen, reps=reps)
    gguf = Path(gguf)
    if not gguf.is_file():
        raise LlamaCppError(f"GGUF file {gguf} not found; prepare() makes it")
    tool = llama_tool(Path(llama_src), "llama-bench")
    cmd = [tool, "-m", gguf, "-t", threads, "-p", n_prompt, "-n", n_gen, "-r", reps, "-o", "json"]
    output = _run(cmd, f"llama-bench on {gguf}")
    try:
        rows = json.loads(output)
    except json.JSONDecodeError as exc:
        raise LlamaCppError(f"llama-bench on {gguf} printed no JSON ({exc}); its output began: {output[:300]!r}") from None
    return {"decode": _avg_ts(rows, 0, n_gen, gguf), "prefill": _avg_ts(rows, n_prompt, 0, gguf)}


def check_counts(**counts: int) -> None:
    """Every one of ``counts`` (llama-bench's threads, token counts, repetitions) is a positive int."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")


def llama_tool(llama_src: Path, name: str) -> Path:
    """``llama_src/build/bin/<name>``, or an error naming the missing binary and how to build it."""
    if not llama_src.is_dir():
        raise LlamaCppError(f"llama.cpp source {llama_src} not found (set RWKVKIT_LLAMA_CPP or pass --llama-src)")
    path = llama_src / "build" / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LlamaCppError(f"{path} not found or not executable; {BUILD_HINT.format(src=llama_src)}")
    return path


def converter_script(llama_src: Path) -> Path:
    """``llama_src/convert_hf_to_gguf.py``, or an error naming it."""
    script = llama_src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LlamaCppError(f"{script} not found: RWKVKIT_LLAMA_CPP / --llama-src must be a llama.cpp source tree")
    return script


def converter_python() -> Path:
    """The interpreter that runs ``convert_hf_to_gguf.py``: ``RWKVKIT_LLAMA_PYTHON``, else this one."""
    named = os.environ.get("RWKVKIT_LLAMA_PYTHON")
    if not named:
        return Path(sys.executable)
    path = Path(named) if os.sep in named else Path(shutil.which(named) or named)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LlamaCppError(f"RWKVKIT_LLAMA_PYTHON={named!r}: no such executable")
    return path


def _write_via_partial(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to ``<path>.partial``, renamed to ``path`` only once it succeeded."""
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        if not tmp.is_file():
            raise LlamaCppError(f"{tmp} was not written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _run(cmd: Sequence[object], what: str, hint: str = "") -> str:
    """Run ``cmd``; its standard output, or an error with the end of what it printed."""
    args = [str(part) for part in cmd]
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise LlamaCppError(f"{what}: cannot start {args[0]}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        advice = f"\n{hint}" if hint and "ModuleNotFoundError" in tail else ""
        raise LlamaCppError(f"{what} failed (exit {done.returncode}): {' '.join(args)}\n{tail}{advice}")
    return done.stdout


def _avg_ts(rows: Any, n_prompt: int, n_gen: int, gguf: Path) -> float:
    """avg_ts of the llama-bench row with these token counts (0 = that phase not run)."""
    found = [row for row in rows if isinstance(row, dict) and row.get("n_prompt") == n_prompt and row.get("n_gen") == n_gen] if isinstance(rows, list) else []
    if len(found) != 1 or "avg_ts" not in found[0]:
        raise LlamaCppError(f"llama-bench on {gguf}: expected one row with n_prompt={n_prompt}, n_gen={n_gen} and avg_ts; got {len(found)}")
    return float(found[0]["avg_ts"])


def default_checkpoint() -> Path:
    """bench_cpu.py's random World 0.1B checkpoint (same path and seed), made if missing."""
    path = MODEL_DIR / "random-0.1B.pth"
    if not path.exists():
        from rwkvkit.testing import make_checkpoint

        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        make_checkpoint(path, **SHAPE_0_1B)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llama.cpp decode/prefill tok/s on an RWKV-7 checkpoint in F16, Q8_0 and Q4_0.")
    parser.add_argument("--llama-src", type=Path, default=os.environ.get("RWKVKIT_LLAMA_CPP"), help="llama.cpp source tree with build/bin (default: $RWKVKIT_LLAMA_CPP)")
    parser.add_argument("--checkpoint", type=Path, default=None, help=f"RWKV-7 checkpoint (default: {MODEL_DIR}/random-0.1B.pth, made if missing)")
    parser.add_argument("--out-dir", type=Path, default=MODEL_DIR / "llama-cpp", help="where the fla folder and the GGUF files go (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RWKVKIT_BENCH_THREADS", "2")), help="default: $RWKVKIT_BENCH_THREADS or 2")
    parser.add_argument("--n-prompt", type=int, default=512, help="prompt tokens for prefill (default: %(default)s)")
    parser.add_argument("--n-gen", type=int, default=64, help="generated tokens for decode (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="llama-bench repetitions (default: %(default)s)")
    args = parser.parse_args(argv)
    from rwkvkit.errors import RwkvkitError

    if args.llama_src is None:
        parser.error("no llama.cpp source: set RWKVKIT_LLAMA_CPP or pass --llama-src")
    try:
        check_counts(threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=args.reps)
        llama_tool(args.llama_src, "llama-bench")
        paths = prepare(args.checkpoint or default_checkpoint(), args.llama_src, args.out_dir)
        print(f"llama.cpp {args.llama_src}, {args.threads} threads, pp{args.n_prompt} / tg{args.n_gen}, {args.reps} reps")
        print(f"{'format':<6} {'decode tok/s':>13} {'prefill tok/s':>14}")
        for fmt, path in paths.items():
            speed = bench(args.llama_src, path, args.threads, args.n_prompt, args.n_gen, args.reps)
            print(f"{fmt:<6} {speed['decode']:>13.2f} {speed['prefill']:>14.2f}", flush=True)
    except (LlamaCppError, RwkvkitError, ValueError) as exc:  # rwkvkit's: the checkpoint or its conversion
        print(f"llama_cpp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
