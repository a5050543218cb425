"""The backend interface: the named ops an architecture's math (``rwkvkit.models.rwkv7``) is written in.

A backend instance serves one stage of layers at one Placement. It prepares checkpoint tensors
(cast, move, transpose, quantize) once at load time and then supplies the ops on every forward
pass. Each op has a plain-torch default here that *is* the reference math; a backend makes ops
fast and never re-sequences a block, so the sequence of a block exists once, in the architecture
module. Constants (norm epsilons, the decay scale) and the order of the token-shift mixes come
from the architecture as arguments, never from a backend's own copy.

Ops: ``ln_mix`` (norm + token shift + mixes), ``project`` (several matrices against their inputs,
with an epilogue and a residual add), ``lora`` (low-rank factor pairs), ``time_mix_core``
(RWKV-7: everything between the projections and the output projection) over ``wkv`` (the scan)
and ``group_norm``; ``linear``, ``layer_norm`` and ``embed`` underneath. The older generations'
scans: ``wkv6`` (RWKV-5 and -6) and ``wkv4`` (RWKV-4, with its max-tracking state).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F

from rwkvkit.strategy import Placement

if TYPE_CHECKING:
    from rwkvkit.checkpoint import Checkpoint, WeightSource


class Role(Enum):
    """What a checkpoint tensor is used for, so a backend can lay it out (or quantize it) to suit."""

    MATRIX = "matrix"  # [out, in] projection, applied with ``Backend.linear``
    LORA_IN = "lora_in"  # the first of a low-rank pair, [in, rank], applied with ``Backend.lora``
    LORA_OUT = "lora_out"  # the second, [rank, out]
    VECTOR = "vector"  # per-channel parameters, stored flat
    VECTOR_F32 = "vector_f32"  # per-channel parameters kept in float32 whatever the activation dtype (decays, bonuses: exponents)
    EMBEDDING = "embedding"  # [vocab, C] rows gathered by token id


class Epilogue(IntEnum):
    """An activation applied to a product's output (same values as ``enum class Epilogue`` in the kernels)."""

    NONE = 0
    TANH = 1
    SIGMOID = 2
    RELU_SQUARE = 3

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        if self is Epilogue.TANH:
            return torch.tanh(y)
        if self is Epilogue.SIGMOID:
            return torch.sigmoid(y)
        if self is Epilogue.RELU_SQUARE:
            return torch.relu(y) ** 2
        return y


def project_epilogues(xs: Sequence[Any], epilogues: Sequence[Epilogue] | None, residual: Any) -> Sequence[Epilogue]:
    """``project``'s arguments checked (a residual goes with one product) and its epilogues
    spelled out (none given: ``NONE`` for each), for the default and every override alike."""
    if residual is not None and len(xs) != 1:
        raise ValueError("project: a residual goes with exactly one product")
    return epilogues or [Epilogue.NONE] * len(xs)


class Backend(ABC):
    """Ops for one Placement. Subclasses register through ``register_backends``."""

    name: ClassVar[str]
    priority: ClassVar[int] = 0  # backend "auto" tries higher first (built-ins: cuda 30, cpu/int8 20, torch -10)
    quants: ClassVar[tuple[str, ...]] = ()  # quantized weight formats it runs (a Placement's ``quant``, e.g. "i8")

    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    @classmethod
    def unavailable_reason(cls, placement: Placement) -> str | None:
        """None when this backend can run ``placement`` here, else a reason a user can act on."""
        if placement.device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device found; try strategy 'cpu fp32'"
        if placement.device.type == "mps" and not torch.backends.mps.is_available():
            return "no MPS device found; try strategy 'cpu fp32'"
        if placement.quant and placement.quant not in cls.quants:
            runs = f"{'/'.join(cls.quants)} or unquantized" if cls.quants else "unquantized"
            return f"{placement.quant} weights need a quantizing backend (this one runs {runs} weights)"
        return None

    def prepare(self, tensor: torch.Tensor, role: Role) -> Any:
        """Move a checkpoint tensor to this placement (no copy when it already matches)."""
        if role in (Role.VECTOR, Role.VECTOR_F32):
            tensor = tensor.flatten()
        dtype = torch.float32 if role is Role.VECTOR_F32 else self.placement.dtype
        return tensor.to(device=self.placement.device, dtype=dtype).contiguous()

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

    def prepare_block(self, weights: Any, spec: Any, constants: Any) -> Any:
        """Called once per resident block at load time, with the model's spec (dimensions) and the
        architecture's constants: a backend may return the weights with whatever it derives from
        them (native layouts, padded copies), so nothing is derived later from a caller's tensors
        or from a copy of the constants. The default keeps them as they are."""
        return weights

    def fused_stage(self, weights: Sequence[Any], x: torch.Tensor, v_first: torch.Tensor | None, states: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, list[Any]] | None:
        """A whole stage's blocks in one native call, where per-op Python overhead is a visible
        share of a decoded token; None (the default) where this backend has none for these shapes,
        and the model runs the architecture's ``block`` over these ops. A fast path must be built
        from the same kernels as this backend's ops (tested op by op against the defaults here)."""
        return None

    def fused_decode(self, table: Any, weights: Sequence[Any], head: Any, ids: torch.Tensor, states: Sequence[Any]) -> tuple[torch.Tensor, list[Any]] | None:
        """A whole model held by this one stage, for one token per sequence (``ids [B, 1]``): the
        embedding, every block and the head in one native call, returning float32 logits
        ``[B, V]`` and the new layer states. None (the default) where this backend has none for
        these weights and shapes; the model then runs ``embed``, the architecture's blocks and its
        head. Like ``fused_stage``, it must compose this backend's own kernels."""
        return None

    def embed(self, table: Any, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a table prepared with ``Role.EMBEDDING``: ``ids [B, T] -> [B, T, C]``
        (``embedding`` gathers rows ~15x faster than ``table[ids]`` on the CPU)."""
        return F.embedding(ids.to(self.placement.device), table)

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

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def group_norm(self, x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        """Normalise ``x [..., C]`` in ``groups`` contiguous channel groups (one per head)."""
        shape = x.shape
        return F.group_norm(x.reshape(-1, shape[-1]), groups, weight, bias, eps).view(shape)

    # ---- fused ops: the defaults are the reference math

    def ln_mix(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x_prev: torch.Tensor, mixes: Sequence[torch.Tensor], eps: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Layer norm of ``x [B, T, C]``, then one token-shift mix per vector, in the order given:
        ``xn + (shifted xn - xn) * m``, where the shift brings each position its predecessor and
        ``x_prev [B, C]`` (from the state) to the first. Returns ``(xn[:, -1]`` (the state's new
        x_prev), ``[mixed [B, T, C], ...])``."""
        xn = self.layer_norm(x, weight, bias, eps)
        dx = torch.cat((x_prev.unsqueeze(1), xn[:, :-1]), dim=1) - xn
        return xn[:, -1], [torch.addcmul(xn, dx, m) for m in mixes]

    def project(
        self, xs: Sequence[torch.Tensor], weights: Sequence[Any], epilogues: Sequence[Epilogue] | None = None, residual: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``[epilogue(linear(x, w))]`` for matrices prepared with ``Role.MATRIX``, each with its own
        input; with ``residual`` (one pair only), ``residual + linear(x, w)`` in ``residual``'s dtype."""
        epilogues = project_epilogues(xs, epilogues, residual)
        ys = [e.apply(self.linear(x, w)) for x, w, e in zip(xs, weights, epilogues)]
        return ys if residual is None else [residual + ys[0].to(residual.dtype)]

    def lora(self, xs: Sequence[torch.Tensor], pairs: Sequence[tuple[Any, Any, Epilogue]]) -> list[torch.Tensor]:
        """Low-rank products ``act(x @ first) @ second`` for factor pairs prepared with
        ``Role.LORA_IN`` ``[in, rank]`` and ``Role.LORA_OUT`` ``[rank, out]``, each with its own input."""
        return [act.apply(x @ first) @ second for x, (first, second, act) in zip(xs, pairs)]

    def time_mix_core(
        self,
        w: Any,
        kv: torch.Tensor,
        r: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        w_lora: torch.Tensor,
        a_lora: torch.Tensor,
        g: torch.Tensor,
        v_lora: torch.Tensor | None,
        v_first: torch.Tensor | None,
        c: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RWKV-7's time mixing between the projections and the output projection: decay, in-context
        rate ``a``, removal key ``kk``, written key, value residual, the WKV scan, GroupNorm, the
        current token's bonus and the gate. ``w``: a layer's ``TimeMixWeights`` (w0, a0, v0, k_k,
        k_a, r_k, ln_x); ``c``: the architecture's ``Constants``. Inputs ``[B, T, C]``: the r/k/v
        projections, the decay and rate LoRA outputs (before w0/a0), the gate, the value-residual
        LoRA output (None, with ``v_first``, in layer 0). Returns ``(out [B, T, C]`` (the output
        projection's input), new ``kv`` (the input is not modified), ``v_first)``: layer 0 hands
        its values to the layers after it."""
        B, T, C = r.shape
        H, N = kv.shape[1], kv.shape[2]
        decay = torch.exp(-c.decay_scale * torch.sigmoid((w.w0 + w_lora).float()))  # (e^-e^-0.5 ~ 0.54, 1)
        a = torch.sigmoid(w.a0 + a_lora)
        kk = F.normalize((k * w.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=c.kk_eps)  # unit "removal" key per head
        k = k * (1 + (a - 1) * w.k_a)
        if v_first is None:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(w.v0 + v_lora))
        heads = (B, T, H, N)
        y, kv = self.wkv(kv, r.view(heads), decay.view(heads), k.view(heads), v.view(heads), kk, a.view(heads))
        y = self.group_norm(y, H, w.ln_x_weight, w.ln_x_bias, c.group_norm_eps)
        bonus = (r * k * w.r_k).view(heads).sum(dim=-1, keepdim=True) * v.view(heads)  # the current token's own k.r
        return (y + bonus.view(B, T, C)) * g, kv, v_first

    def wkv6(
        self, s: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The WKV scan of RWKV-6 (and RWKV-5, whose decay is the same for every token). Inputs
        ``r, k, v [B, T, H, N]``, decay ``w [B, T, H, N]`` float32 in (0, 1), bonus ``u [H, N]``
        float32, state ``s [B, H, N, N]`` float32 (key index first). Per token and head::

            a = k v^T ;  y = r (u * a + s) ;  s = a + w * s      (u, w scale the rows: per key)

        Returns ``(y [B, T, H*N]`` float32 — the GroupNorm after it reads unrounded values, as in
        the reference — ``, new s)``; must not modify ``s`` in place."""
        B, T, H, N = r.shape
        r, k, v = (t.float() for t in (r, k, v))
        u = u.view(H, N, 1)
        ys = []
        for t in range(T):
            a = k[:, t, :, :, None] @ v[:, t, :, None, :]  # [B, H, N, N]
            ys.append(r[:, t, :, None, :] @ (u * a + s))  # [B, H, 1, N]
            s = a + w[:, t, :, :, None] * s
        return torch.stack(ys, dim=1).view(B, T, H * N), s

    def wkv4(
        self, aa: torch.Tensor, bb: torch.Tensor, pp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """RWKV-4's WKV over T tokens, numerically stable: the state keeps ``aa, bb [B, C]`` scaled
        by ``exp(-pp)``, ``pp`` the running maximum exponent, so no ``exp`` overflows. ``k, v
        [B, T, C]`` float32, ``w = -exp(time_decay)`` and ``u = time_first`` ``[C]`` float32.
        Per token::

            y = (e^u+k v + aa) / (e^u+k + bb)       (each term rescaled by the larger exponent)
            aa, bb = e^w aa + e^k v, e^w bb + e^k

        Returns ``(y [B, T, C]`` float32, new ``aa, bb, pp)``; the inputs are not modified."""
        ys = []
        for t in range(k.shape[1]):
            kk, vv = k[:, t], v[:, t]
            ww = u + kk
            p = torch.maximum(pp, ww)
            e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
            ys.append((e1 * aa + e2 * vv) / (e1 * bb + e2))
            ww = w + pp
            p = torch.maximum(ww, kk)
            e1, e2 = torch.exp(ww - p), torch.exp(kk - p)
            aa, bb, pp = e1 * aa + e2 * vv, e1 * bb + e2, p
        return torch.stack(ys, dim=1), aa, bb, pp
