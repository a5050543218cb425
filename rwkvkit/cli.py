"""The ``rwkvkit`` command. ``rwkvkit info CHECKPOINT`` describes a checkpoint without running it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from rwkvkit import __version__
from rwkvkit.errors import RwkvkitError


def _info(args: argparse.Namespace) -> None:
    from rwkvkit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    n_params = sum(t.numel() for t in ckpt.tensors.values())
    print(f"{ckpt.path}: RWKV-{ckpt.spec.version}, {n_params / 1e6:.1f}M parameters, fingerprint {ckpt.fingerprint()}")
    for key, value in asdict(ckpt.spec).items():
        print(f"  {key:<10} {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rwkvkit", description="Run RWKV language models.")
    parser.add_argument("--version", action="version", version=f"rwkvkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="describe a checkpoint: architecture, dimensions, fingerprint")
    info.add_argument("checkpoint", help="path to a .pth or .safetensors file (suffix optional)")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except RwkvkitError as exc:
        print(f"rwkvkit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
