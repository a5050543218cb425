"""The ``torch`` backend: plain PyTorch ops on any device and dtype.

It is the reference for every faster backend (and the GPU path when no custom kernels are built):
readable rather than fast. The WKV scan runs token by token in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkvkit.backend import Backend
from rwkvkit.hookspecs import hookimpl


class TorchBackend(Backend):
    name = "torch"
    priority = -10  # the fallback: any other backend that can run a placement comes first

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def wkv(self, kv, r, decay, k, v, kk, a):
        B, T, H, N = r.shape
        r, k, v, kk, a = (t.float() for t in (r, k, v, kk, a))
        b = kk * a
        ys = []
        for t in range(T):
            kv = (
                kv * decay[:, t, :, None, :]
                - (kv @ kk[:, t, :, :, None]) @ b[:, t, :, None, :]
                + v[:, t, :, :, None] @ k[:, t, :, None, :]
            )
            ys.append(kv @ r[:, t, :, :, None])  # [B, H, N, 1]
        y = torch.stack(ys, dim=1).view(B, T, H * N)
        return y.to(self.placement.dtype), kv


@hookimpl
def register_backends(register) -> None:
    register(TorchBackend)
