"""The backend interface: the few ops the RWKV-7 math (``rwkvkit.models.rwkv7``) is written in.

A backend instance serves one stage of layers at one Placement. It prepares checkpoint tensors
(cast, move, transpose, quantize) once at load time and then supplies ``linear``, ``wkv`` and the
norms on every forward pass. The math itself is written once, so a new backend only has to make
these ops fast.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from rwkvkit.strategy import Placement

if TYPE_CHECKING:
    from rwkvkit.checkpoint import Checkpoint, WeightSource


class Role(Enum):
    """What a checkpoint tensor is used for, so a backend can lay it out (or quantize it) to suit."""

    MATRIX = "matrix"  # [out, in] projection, applied with ``Backend.linear``
    LORA = "lora"  # small [in, rank] / [rank, in] factors, applied with ``@``
    VECTOR = "vector"  # per-channel parameters, stored flat
    EMBEDDING = "embedding"  # [vocab, C] rows gathered by token id


class Backend(ABC):
    """Ops for one Placement. Subclasses register through ``register_backends``."""

    name: ClassVar[str]
    priority: ClassVar[int] = 0  # backend "auto" tries higher first (built-ins: cuda 30, cpu/int8 20, torch -10)

    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        """None when this backend can run ``placement`` here, else a reason a user can act on."""
        if placement.device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device found; try strategy 'cpu fp32'"
        if placement.device.type == "mps" and not torch.backends.mps.is_available():
            return "no MPS device found; try strategy 'cpu fp32'"
        return None

    def prepare(self, tensor: torch.Tensor, role: Role) -> Any:
        """Move a checkpoint tensor to this placement (no copy when it already matches)."""
        if role is Role.VECTOR:
            tensor = tensor.flatten()
        return tensor.to(device=self.placement.device, dtype=self.placement.dtype).contiguous()

    @contextmanager
    def loading(self, checkpoint: Checkpoint, layers: range) -> Iterator[None]:
        """Spans every ``prepare_source`` call of one model load for this backend's stage
        (``layers``; the embedding on the first stage, the head on the last), so a backend can key
        a cache of prepared weights by the checkpoint and write it once at the end. The code after
        the ``yield`` runs only when the load succeeded. The default does nothing."""
        yield

    def prepare_source(self, source: WeightSource, role: Role) -> Any:
        """Prepare one checkpoint weight, read on demand (``source.rows()``): a backend may serve
        it from a cache or read it in row blocks. The default is :meth:`prepare` on the whole."""
        return self.prepare(source.rows(), role)

    def prepare_block(self, weights: Any, spec: Any) -> Any:
        """Called once per resident block at load time, with the model's spec (dimensions): a
        backend may return the weights with whatever it derives from them (native layouts, padded
        copies), so nothing is derived later from a caller's tensors. The default keeps them as is."""
        return weights

    def block(self, weights: Any, x: torch.Tensor, v_first: torch.Tensor | None, state: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One residual block (see :func:`rwkvkit.models.rwkv7.block`); a backend may replace it
        with a fused implementation for the shapes it handles best."""
        from rwkvkit.models import rwkv7  # the math module imports this one

        return rwkv7.block(self, weights, x, v_first, state)

    def blocks(self, weights: Iterable[Any], x: torch.Tensor, v_first: torch.Tensor | None, states: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None, list[Any]]:
        """A stage's blocks in order (``block`` on each); a backend may run them all in one native
        call, where per-layer Python overhead is a visible share of a decoded token."""
        new_states = []
        for w, s in zip(weights, states):
            x, v_first, s = self.block(w, x, v_first, s)
            new_states.append(s)
        return x, v_first, new_states

    def embed(self, table: Any, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a table prepared with ``Role.EMBEDDING``: ``ids [B, T] -> [B, T, C]``."""
        return table[ids.to(self.placement.device)]

    @abstractmethod
    def linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        """``x [..., in] -> [..., out]`` for a weight prepared with ``Role.MATRIX``."""

    @abstractmethod
    def wkv(
        self, kv: torch.Tensor, r: torch.Tensor, decay: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kk: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The WKV-7 scan over T tokens. Inputs ``[B, T, H, N]`` (``decay`` float32), state
        ``kv [B, H, N, N]`` float32 (value index first). Per token and head::

            kv = kv * decay[None, :] - (kv @ kk) (kk * a)^T + v k^T ;  y = kv @ r

        Returns ``(y [B, T, H*N] in the activation dtype, new kv)``; must not modify ``kv`` in place.
        """

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def group_norm(self, x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        """Normalise ``x [..., C]`` in ``groups`` contiguous channel groups (one per head)."""
        shape = x.shape
        return F.group_norm(x.reshape(-1, shape[-1]), groups, weight, bias, eps).view(shape)
