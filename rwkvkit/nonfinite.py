"""Saying where a model's NaN/Inf comes from, instead of letting it reach the sampler.

Bad weights (a corrupted or badly converted checkpoint) or an overflowing dtype give non-finite
logits; sampling from them would silently produce garbage or blame the bans.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.model import Model
from rwkvkit.state import State


def bad_logits(logits: torch.Tensor) -> str | None:
    """``"NaN"`` or ``"+inf"`` if ``logits`` hold one (``-inf`` is a zero probability, allowed)."""
    if torch.isfinite(logits).all():
        return None
    if torch.isnan(logits).any():
        return "NaN"
    return "+inf" if torch.isposinf(logits).any() else None


@torch.inference_mode()
def first_nonfinite(model: Model, tokens: Sequence[int], state: State | None) -> str:
    """Rerun one forward step block by block and name the first part whose output is not finite."""
    state = model.initial_state() if state is None else model.adopt_state(state)
    x = model.stages[0].ops.embed(model.emb, torch.tensor([list(tokens)]))
    if not torch.isfinite(x).all():
        return "the embedding (emb.weight, blocks.0.ln0)"
    carry = None
    for stage in model.stages:
        p = stage.ops.placement
        x = x.to(p.device, p.dtype)
        carry = carry.to(p.device, p.dtype) if isinstance(carry, torch.Tensor) else carry
        blocks = stage.streamer.blocks(stage.blocks) if stage.streamer else stage.blocks
        for i, weights, layer_state in zip(stage.layers, blocks, state.layers[stage.layers.start : stage.layers.stop]):
            x, carry, _ = model.architecture.block(stage.ops, weights, x, carry, layer_state)
            if not torch.isfinite(x).all():
                return f"layer {i} (blocks.{i}.*)"
    return "the output head (ln_out, head.weight)"


def check_logits(logits: torch.Tensor, model: Model, tokens: Sequence[int], state: State | None, where: str, rerun: bool = True) -> None:
    """Raise a RwkvkitError naming the first non-finite layer if the step ``tokens`` from ``state``
    gave NaN/+inf ``logits``; ``where`` says which step it was. ``rerun=False``: the state before
    the step is gone (a CUDA graph updated it in place), so the layer is not named."""
    kind = bad_logits(logits)
    if kind is not None:
        culprit = (
            f"the first non-finite output is that of {first_nonfinite(model, tokens, state)}"
            if rerun
            else "the step ran in a CUDA graph, which keeps no earlier state (generate with cuda_graphs=False to name the layer)"
        )
        raise RwkvkitError(
            f"the model produced non-finite logits ({kind}) {where}; {culprit}: the checkpoint's weights may hold NaN/Inf "
            f"(check {model.checkpoint_path}), or activations overflow in this strategy's dtype (try fp32)"
        )
