"""The ``rwkvkit`` command (also ``python -m rwkvkit``): ``run`` generates text from Hydra configs
(everything after ``run`` is Hydra's command line, free-text values taken literally: see
rwkvkit.argv), ``serve`` runs an OpenAI-compatible server and ``chat`` a terminal chat (Hydra
apps on the same groups), ``info CHECKPOINT`` describes a checkpoint, ``convert SRC DST`` converts
one (rwkvkit.formats.convert), ``plugins`` lists plugins,
``build-kernels`` prebuilds the CUDA kernels. Every error is one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from dataclasses import asdict
from types import FrameType

from rwkvkit import __version__
from rwkvkit.errors import EXIT_ERROR, InputError, RwkvkitError, Terminated, report, stop_of

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a program stopped by `| head`
COMMANDS = ["run", "serve", "chat", "info", "convert", "plugins", "build-kernels"]
# the Hydra apps: command -> (config in rwkvkit.conf, "module:task")
HYDRA_APPS = {"run": ("run", "rwkvkit.run:run_job"), "serve": ("serve", "rwkvkit.server.main:serve_job"), "chat": ("chat", "rwkvkit.chat:chat_job")}


def _info(args: argparse.Namespace) -> None:
    from rwkvkit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)  # a path, pkg://package/file, a model config name or an HF folder
    n_params = sum(t.numel() for t in ckpt.tensors.values())
    print(f"{ckpt.path}: RWKV-{ckpt.spec.version}, {n_params / 1e6:.1f}M parameters, fingerprint {ckpt.fingerprint()}")
    print(f"  {'architecture':<10} {ckpt.architecture.name} ({ckpt.architecture.describe()})")
    if ckpt.path.is_dir():
        from rwkvkit.formats.hf import describe

        print(f"  {'format':<10} {describe(ckpt.path)}")
    else:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values()})
        print(f"  {'format':<10} {ckpt.path.suffix} file, {'/'.join(dtypes)}")
    if ckpt.tuned_state:
        print(f"  {'state':<10} carries a tuned initial state ({len(ckpt.tuned_state)} x blocks.N.att.time_state): generation starts from it")
    for key, value in asdict(ckpt.spec).items():
        print(f"  {key:<10} {value}")


def _convert(args: argparse.Namespace) -> None:
    from rwkvkit.formats.convert import convert, parse_size
    from rwkvkit.formats.lora import as_loras

    loras = as_loras((path, _number(alpha, "--lora ALPHA")) for path, alpha in args.lora or ())
    done = convert(args.src, args.dst, args.dtype, args.force, parse_size(args.max_shard_size), loras)
    shards = [f for f in done.files if f.endswith(".safetensors")]
    what = {"hf": f"Hugging Face folder, {len(shards)} safetensors file{'s' if len(shards) > 1 else ''}", "pth": ".pth file", "safetensors": ".safetensors file"}[done.kind]
    print(f"rwkvkit: wrote {done.path} ({what}); read back and verified: content digest {done.digest[:16]}, the same tensors (so the same logits) as {args.src}")


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{what} {text!r}: expected a number") from None


def _plugins(args: argparse.Namespace) -> None:
    from rwkvkit.registry import registry

    infos = registry.plugins()
    if args.json:
        print(json.dumps([asdict(info) for info in infos], indent=2))
        return
    for info in infos:
        print(f"{info.name} ({info.distribution} {info.version})")
        for kind, names in info.registers.items():
            print(f"  {kind}: {', '.join(names)}")


def _build_kernels(args: argparse.Namespace) -> None:
    from rwkvkit.kernels_build import build

    print(f"rwkvkit: CUDA kernels ready in {build(verbose=args.verbose)}")


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _stop_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _run(args: list[str], command: str = "run") -> int:
    """Hand the command line of a Hydra app (``run``, ``serve``, ``chat``) to Hydra (so -m sweeps, launchers, --config-dir all work), with
    free-text values quoted for it (rwkvkit.argv) and its errors raised instead of printed
    (HYDRA_FULL_ERROR), so that each becomes one line.

    SIGTERM stops a run the way Ctrl-C does (see Terminated); a stop at any point, start-up
    included, ends with one line and exit code 130 (Ctrl-C) or 143 (SIGTERM)."""
    held: list[int] = []  # Ctrl-C / SIGTERM while modules import, delivered once they have
    saved_argv, saved_handler = sys.argv, signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    saved_int = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    saved_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        # An interrupt inside a C extension's import (torch, numpy) leaves it half-initialised: a
        # later AttributeError, an abort from C++, or a death by the signal instead of one line.
        import hydra
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from rwkvkit.argv import check_flags, hydra_error, hydra_overrides
        from rwkvkit.completion import COMPLETION_FLAGS
        from importlib import import_module

        from rwkvkit.registry import registry
        from rwkvkit.server.config import register_configs

        config_name, target = HYDRA_APPS[command]
        module, _, task = target.partition(":")
        overrides = hydra_overrides(args, sys.stdin if command == "run" else io.StringIO())  # chat reads stdin itself
        check_flags(overrides)
        register_configs()
        registry.plugins()  # plugins may add config options (ConfigStore) on import: load them first
        entry = hydra.main(config_path="pkg://rwkvkit.conf", config_name=config_name, version_base=None)(getattr(import_module(module), task))
        # an installed completion script registers and calls the program named here: `rwkvkit`
        sys.argv = ["rwkvkit" if any(a in COMPLETION_FLAGS for a in overrides) else f"rwkvkit {command}", *overrides]
        signal.signal(signal.SIGINT, saved_int)
        signal.signal(signal.SIGTERM, _raise_terminated)
        if held:
            raise _stop_for(held[0])
        entry()
    except RwkvkitError as exc:
        return report(exc)
    except (HydraException, OmegaConfBaseException) as exc:
        return report(hydra_error(exc))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt as exc:  # before the run directory exists (run_job reports later stops)
        status, code = stop_of(exc)
        print(f"\nrwkvkit: {status}", file=sys.stderr)
        return code
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGINT, saved_int)
        signal.signal(signal.SIGTERM, saved_handler)
        if saved_full_error is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
    return 0


def _complete(argv: list[str]) -> int:
    """Answer the installed completion script (``rwkvkit -sc query=SHELL``)."""
    from rwkvkit.completion import prepare_query, subcommands

    if prepare_query():
        return _run(argv)
    print(subcommands(os.environ.get("COMP_LINE", ""), COMMANDS, argv[1].partition("=")[2]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a reader that stops early (``rwkvkit info X | head -2``) ends it quietly."""
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: list[str]) -> int:
    from rwkvkit.completion import is_query

    if argv[:1] and argv[0] in HYDRA_APPS:
        return _run(argv[1:], argv[0])
    if is_query(argv):
        return _complete(argv)
    parser = argparse.ArgumentParser(prog="rwkvkit", description="Run RWKV language models.")
    parser.add_argument("--version", action="version", version=f"rwkvkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="generate text: rwkvkit run [hydra overrides], see `rwkvkit run --help`")
    commands.add_parser("serve", help="serve the OpenAI API on the batching engine: rwkvkit serve [hydra overrides]")
    commands.add_parser("chat", help="chat in the terminal: rwkvkit chat [hydra overrides]")
    info = commands.add_parser("info", help="describe a checkpoint: architecture, dimensions, fingerprint")
    info.add_argument("checkpoint", help="a .pth or .safetensors path (suffix optional), a Hugging Face model folder, pkg://package/file, or a model config name (demo)")
    info.set_defaults(func=_info)
    conv = commands.add_parser("convert", help="convert a model between .pth, .safetensors and Hugging Face folders (verified)")
    conv.add_argument("src", help="the model: anything `info` takes (.pth, .safetensors, HF folder, config name)")
    conv.add_argument("dst", help="a .pth or .safetensors file, or a folder (no suffix) for a Hugging Face folder")
    conv.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast the weights (default: keep the source's)")
    conv.add_argument("--force", action="store_true", help="replace an existing destination (other files in a folder are kept)")
    conv.add_argument("--lora", nargs=2, action="append", metavar=("FILE", "ALPHA"), help="merge a LoRA adapter trained with lora_alpha ALPHA (repeatable, in order)")
    conv.add_argument("--max-shard-size", default="5GB", help="largest safetensors file in a folder before sharding (default 5GB)")
    conv.set_defaults(func=_convert)
    plugins = commands.add_parser("plugins", help="list plugins, their versions and what they register")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of text")
    plugins.set_defaults(func=_plugins)
    kernels = commands.add_parser("build-kernels", help="build the CUDA kernels of the 'cuda' backend now instead of on first use")
    kernels.add_argument("--verbose", action="store_true", help="show the compiler commands")
    kernels.set_defaults(func=_build_kernels)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except RwkvkitError as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
