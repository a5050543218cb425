"""Train the demo RWKV-7 shipped as ``rwkvkit/demo/demo.pth`` (run scripts/demo_corpus.py first).

The model is rwkvkit's own RWKV-7 math (``rwkvkit.models.rwkv7``) over trainable tensors kept in
the checkpoint's key layout, so what is trained is exactly what rwkvkit (and the ``rwkv`` package)
later runs. Initialisation and optimiser settings follow RWKV-LM (RWKV-v7/train_temp). Only the
WKV scan is swapped for :class:`ChunkedBackend`, an exact chunked form that makes a training step
about 2.5x faster than the per-token loop of the torch backend.

Training is truncated backpropagation through time: each batch row reads its own contiguous slice
of the corpus and carries its (detached) state from one step to the next, so the model learns to
run on arbitrarily long text as ``rwkvkit run`` and the perplexity harness use it. Everything is
deterministic from ``--seed`` (with a fixed thread count). On a CPU shared with other jobs, run
with ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads otherwise stall for seconds per step.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkvkit.backend import Role
from rwkvkit.checkpoint import ModelSpec, expected_shapes, validate
from rwkvkit.compat import RWKV
from rwkvkit.models import rwkv7
from rwkvkit.plugins.torch_backend import TorchBackend
from rwkvkit.quality import perplexity
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.state import LayerState
from rwkvkit.strategy import Placement
from rwkvkit.testing import make_spec

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "rwkvkit" / "demo"


class ChunkedBackend(TorchBackend):
    """The torch backend with the WKV-7 scan computed ``chunk`` tokens at a time.

    Within a chunk the state update ``S_t = S_{t-1} (D_t - kk_t b_t^T) + v_t k_t^T`` unrolls, with
    ``u_t = -S_{t-1} kk_t`` and cumulative decays ``G_t``, to
    ``S_t = S_0 G_t + sum_{s<=t} (u_s b_s^T + v_s k_s^T) G_t / G_s``; the ``u_t`` then solve a
    unit lower-triangular system, and outputs and the final state are matrix products. The
    decay is at least ``exp(-e^-0.5) ~ 0.545`` per token, so the ``1/G`` factors stay below
    ``0.545^-chunk`` (about 1e8 for 32 tokens): safe in float32.
    """

    def __init__(self, placement: Placement, chunk: int = 32) -> None:
        super().__init__(placement)
        self.chunk = chunk

    def wkv(self, kv, r, decay, k, v, kk, a):
        B, T, H, N = r.shape
        r, k, v, kk, a = (t.float().transpose(1, 2) for t in (r, k, v, kk, a))  # [B, H, T, N]
        log_w = torch.log(decay.float()).transpose(1, 2)
        b = kk * a
        ys = []
        for lo in range(0, T, self.chunk):
            hi = min(lo + self.chunk, T)
            c = torch.cumsum(log_w[:, :, lo:hi], dim=2)  # log G_t, inclusive
            ck, cb = k[:, :, lo:hi] * torch.exp(-c), b[:, :, lo:hi] * torch.exp(-c)  # key side: / G_s
            cr = r[:, :, lo:hi] * torch.exp(c)  # query side: * G_t
            ca = -kk[:, :, lo:hi] * torch.exp(c - log_w[:, :, lo:hi])  # * G_{t-1}
            vv = v[:, :, lo:hi]
            S0t = kv.transpose(-1, -2)
            eye = torch.eye(hi - lo, device=kv.device)
            u = torch.linalg.solve_triangular(
                eye - (ca @ cb.transpose(-1, -2)).tril(-1),
                ca @ S0t + (ca @ ck.transpose(-1, -2)).tril(-1) @ vv,
                upper=False,
                unitriangular=True,
            )
            ys.append(cr @ S0t + (cr @ cb.transpose(-1, -2)).tril() @ u + (cr @ ck.transpose(-1, -2)).tril() @ vv)
            to_end = torch.exp(c[:, :, -1:] - c)  # G_last / G_s <= 1
            kv = kv * torch.exp(c[:, :, -1]).unsqueeze(-2) + u.transpose(-1, -2) @ (b[:, :, lo:hi] * to_end) + vv.transpose(-1, -2) @ (k[:, :, lo:hi] * to_end)
        y = torch.cat(ys, dim=2).transpose(1, 2).reshape(B, T, H * N)
        return y.to(self.placement.dtype), kv


def init_weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """RWKV-LM's RWKV-7 initialisation (``RWKV_Tmix_x070``, ``RWKV_CMix_x070`` and
    ``generate_init_weight``): per-channel curves for the token-shift mixes, decay, in-context
    learning rate and value residual; orthogonal matrices; zeros where training starts from zero
    (LoRA down-projections, output and FFN value matrices). Tensors have the checkpoint's shapes."""
    gen = torch.Generator().manual_seed(seed)
    C, H, N, V, L = spec.n_embd, spec.n_head, spec.head_size, spec.vocab_size, spec.n_layer
    ch = torch.arange(C, dtype=torch.float32)
    ddd, linear = ch / C, ch / (C - 1) - 0.5
    zigzag = ((ch % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()

    def ortho(shape: tuple[int, ...], gain: float) -> torch.Tensor:
        return torch.nn.init.orthogonal_(torch.empty(shape), gain=gain, generator=gen)

    t: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(spec).items():
        name = key.split(".", 2)[-1] if key.startswith("blocks.") else key
        layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
        r01, r10 = layer / (L - 1), 1.0 - layer / L
        if name in ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g"):
            power = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}[name[-1]]
            value = 1.0 - ddd.pow(power * r10)
        elif name == "ffn.x_k":
            value = 1.0 - ddd.pow(r10**4)
        elif name == "att.w0":
            value = -6 + 6 * (ch / (C - 1)) ** (1 + r01**0.3) + 0.5 + zigzag * 2.5
        elif name == "att.a0":
            value = -0.19 + zigzag * 0.3 + linear * 0.4
        elif name == "att.v0":
            value = 0.73 - linear * 0.4
        elif name == "att.k_k":
            value = 0.71 - linear * 0.1
        elif name == "att.k_a":
            value = torch.full((C,), 1.02)
        elif name == "att.r_k":
            value = torch.full(shape, -0.04)
        elif name in ("att.w1", "att.a1", "att.v1", "att.g1", "att.output.weight", "ffn.value.weight"):
            value = torch.zeros(shape)
        elif name in ("att.w2", "att.a2", "att.v2", "att.g2", "att.key.weight"):
            value = ortho(shape, 0.1)
        elif name in ("att.receptance.weight", "att.value.weight", "ffn.key.weight"):
            value = ortho(shape, 1.0)
        elif name == "att.ln_x.weight":
            value = torch.full(shape, ((1 + layer) / L) ** 0.7)
        elif name.endswith(".weight") and ("ln" in name):
            value = torch.ones(shape)
        elif name.endswith(".bias"):
            value = torch.zeros(shape)
        elif name == "emb.weight":
            value = torch.empty(shape).uniform_(-1e-4, 1e-4, generator=gen)
        elif name == "head.weight":
            value = ortho(shape, 0.5 * math.sqrt(V / C) if V > C else 0.5)
        else:
            raise AssertionError(f"no initialisation for {key}")
        t[key] = value.reshape(shape).contiguous()
    return t


class L2Wrap(torch.autograd.Function):
    """RWKV-LM's loss wrapper: a tiny gradient pulling each position's largest logit towards 0,
    which keeps logits (and so fp16/bf16 inference) in a modest range."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (logits,) = ctx.saved_tensors
        top, ids = logits.max(-1, keepdim=True)
        return grad, torch.zeros_like(logits).scatter_(-1, ids, top * 1e-4 / (logits.shape[0] * logits.shape[1]))


def forward(ops: TorchBackend, params: dict[str, torch.Tensor], idx: torch.Tensor, states: list[LayerState]) -> tuple[torch.Tensor, list[LayerState]]:
    """Logits ``[B, T, V]`` and the new states, through rwkvkit's RWKV-7 functions."""

    def fetch(key: str, role: Role, optional: bool) -> torch.Tensor:
        return params[key].flatten() if role is Role.VECTOR else params[key]

    x = rwkv7.embed(params["emb.weight"], params["blocks.0.ln0.weight"], params["blocks.0.ln0.bias"], rwkv7.LN_EPS)[idx]
    v_first, new_states = None, []
    for i, state in enumerate(states):
        x, v_first, state = rwkv7.block(ops, rwkv7.load_weights(rwkv7.BlockWeights, f"blocks.{i}.", fetch), x, v_first, state)
        new_states.append(state)
    return rwkv7.head(ops, rwkv7.load_weights(rwkv7.HeadWeights, "", fetch), x), new_states


def make_optimizer(params: dict[str, torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """RWKV-LM's groups: decay ``w0`` at twice the rate, weight decay on matrices only."""
    groups: dict[str, list[torch.Tensor]] = {"2x": [], "decay": [], "1x": []}
    for key, p in params.items():
        groups["2x" if key.endswith("att.w0") else "decay" if p.squeeze().dim() >= 2 and key.endswith(".weight") else "1x"].append(p)
    return torch.optim.AdamW(
        [
            {"params": groups["1x"], "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": groups["2x"], "weight_decay": 0.0, "lr_scale": 2.0},
            {"params": groups["decay"], "weight_decay": weight_decay, "lr_scale": 1.0},
        ],
        lr=lr,
        betas=(0.9, 0.99),
        eps=1e-18,
    )


def lr_at(step: int, steps: int, lr: float, lr_final: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``lr_final``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * progress))


def save(params: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    tensors = {k: p.detach().to(dtype).contiguous() for k, p in params.items()}
    validate(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "demo" / "train.txt")
    parser.add_argument("--tokenizer", type=Path, default=DEMO / "tokenizer.json")
    parser.add_argument("--heldout", type=Path, default=DEMO / "heldout.txt")
    parser.add_argument("--out", type=Path, default=DEMO / "demo.pth")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "demo", help="intermediate checkpoints")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=128, help="tokens per row per step (backprop window)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-final", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = resolve_tokenizer(args.tokenizer)
    data = torch.tensor(tokenizer.encode(args.corpus.read_text(encoding="utf-8")))
    heldout = args.heldout.read_text(encoding="utf-8")
    spec = make_spec(args.layers, args.dim, tokenizer.vocab_size, args.head_size)
    params = {k: v.requires_grad_() for k, v in init_weights(spec, args.seed).items()}
    n_params = sum(p.numel() for p in params.values())
    print(f"{spec}\n{n_params / 1e6:.2f}M parameters, {len(data)} training tokens", flush=True)

    ops = ChunkedBackend(Placement(torch.device("cpu"), torch.float32))
    opt = make_optimizer(params, args.lr, args.weight_decay)
    B, T, C, H, N = args.batch, args.ctx, spec.n_embd, spec.n_head, spec.head_size
    # row b reads the corpus from its own offset onwards, wrapping around at the end
    offsets = torch.arange(B) * (len(data) // B) + torch.randint(len(data), (1,), generator=torch.Generator().manual_seed(args.seed))
    states = [LayerState(torch.zeros(B, C), torch.zeros(B, H, N, N), torch.zeros(B, C)) for _ in range(spec.n_layer)]
    window = torch.arange(T + 1)
    started, smooth = time.time(), None
    for step in range(args.steps):
        tokens = data[(offsets[:, None] + step * T + window) % len(data)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.lr_final, args.warmup) * group["lr_scale"]
        logits, states = forward(ops, params, tokens[:, :-1], states)
        states = [LayerState(*(t.detach() for t in s.tensors())) for s in states]
        loss = F.cross_entropy(logits.reshape(-1, spec.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        L2Wrap.apply(loss, logits).backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if (step + 1) % 25 == 0:
            elapsed = time.time() - started
            print(f"step {step + 1} loss {smooth:.3f} lr {opt.param_groups[0]['lr']:.2e} {B * T * (step + 1) / elapsed:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            path = save(params, args.work / "demo-latest.pth", torch.float16)
            ppl = perplexity(RWKV(path, "cpu fp32"), tokenizer, heldout)
            print(f"step {step + 1} held-out loss {math.log(ppl):.3f} perplexity {ppl:.2f} (train loss {smooth:.3f}, perplexity {math.exp(smooth):.2f})", flush=True)
    save(params, args.out, torch.float16)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) in {(time.time() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
