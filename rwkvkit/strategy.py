"""ChatRWKV strategy strings -> a Plan: which layers run where, in which dtype, through which backend.

Grammar (ChatRWKV's)::

    strategy := stage ( "->" stage )*
    stage    := device dtype [ "*" N [ "+" ] ]
    device   := cpu | cuda | cuda:K | mps
    dtype    := fp32 | fp16 | bf16, optionally followed by i8 (int8 weights) or, on the CPU, i4 (4-bit weights)

``*N`` gives a stage N layers; a stage without ``*N`` takes the layers left over (at most one may),
and if every stage has a count, the last stage also takes the remainder. ``*N+`` (as in ChatRWKV)
keeps N layers resident on the device and takes the remaining layers as well, streaming them:
their matrices stay in CPU RAM and are copied to the device for each use (``rwkvkit.streaming``),
so a model larger than GPU memory still runs there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from rwkvkit.errors import StrategyError

GRAMMAR = "stage ( -> stage )*, stage = 'device dtype [*N[+]]', device = cpu|cuda|cuda:K|mps, dtype = fp32|fp16|bf16[i8|i4]"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STAGE = re.compile(r"^(?P<device>cpu|cuda(?::\d+)?|mps)\s+(?P<dtype>fp32|fp16|bf16)(?P<quant>i8|i4)?(?:\s+\*(?P<count>\d+)(?P<stream>\+)?)?$", re.ASCII)


@dataclass(frozen=True)
class Placement:
    """Where and how a group of layers runs."""

    device: torch.device
    dtype: torch.dtype  # activation (and unquantized weight) dtype
    quant: str | None = None  # "i8" for int8 weights, "i4" for 4-bit ones
    stream: bool = False  # matrices kept in CPU RAM, copied to the device per use


@dataclass(frozen=True)
class Stage:
    placement: Placement
    layers: range
    backend: str


@dataclass(frozen=True)
class Plan:
    """Stages in layer order; the embedding runs on the first stage, the head on the last."""

    stages: tuple[Stage, ...]
    spec: str


def _parse_stage(text: str, strategy: str) -> tuple[Placement, int | None]:
    m = _STAGE.match(text.strip())
    if not m:
        raise StrategyError(f"invalid strategy {strategy!r}: cannot parse stage {text.strip()!r}; grammar: {GRAMMAR}")
    placement = Placement(
        device=torch.device(m["device"]),
        dtype=DTYPES[m["dtype"]],
        quant=m["quant"],
        stream=bool(m["stream"]),
    )
    if placement.quant == "i4" and placement.device.type != "cpu":
        raise StrategyError(f"invalid strategy {strategy!r}: stage {text.strip()!r}: {m['device']} {m['dtype']}i4 is not built yet; 4-bit weights run on the CPU ('cpu fp32i4', 'cpu bf16i4')")
    if placement.stream and placement.device.type == "cpu":
        raise StrategyError(f"invalid strategy {strategy!r}: stage {text.strip()!r} streams layers from CPU RAM to a GPU ('*N+'), but it runs on the CPU; drop the '+'")
    return placement, None if m["count"] is None else int(m["count"])


def parse_strategy(strategy: str, n_layer: int, backend: str = "auto") -> Plan:
    """Turn a strategy string into a Plan for a model of ``n_layer`` layers."""
    if not isinstance(strategy, str) or not strategy.strip():
        raise StrategyError(f"invalid strategy {strategy!r}: expected a string like 'cpu fp32'; grammar: {GRAMMAR}")
    parsed = [_parse_stage(part, strategy) for part in strategy.split("->")]
    open_stages = [i for i, (placement, count) in enumerate(parsed) if count is None or placement.stream]
    if len(open_stages) > 1:
        raise StrategyError(f"invalid strategy {strategy!r}: only one stage may omit '*N' or stream with '*N+' (it takes the remaining layers)")
    fixed = sum(count for _, count in parsed if count is not None)
    if fixed > n_layer:
        raise StrategyError(f"invalid strategy {strategy!r}: stages ask for {fixed} layers but the model has {n_layer}")
    rest_to = open_stages[0] if open_stages else len(parsed) - 1
    stages, start = [], 0
    for i, (placement, count) in enumerate(parsed):
        rest = n_layer - fixed if i == rest_to else 0
        if placement.stream:  # N resident layers, then the rest streamed
            parts = [(replace(placement, stream=False), count or 0), (placement, rest)]
        else:
            parts = [(placement, (count or 0) + rest)]
        for part, size in parts:
            if size == 0 and not (len(parsed) == len(parts) == 1):
                continue  # ChatRWKV allows '*0' stages; they hold no layers
            stages.append(Stage(part, range(start, start + size), backend))
            start += size
    return Plan(stages=tuple(stages), spec=strategy)
