"""Top-a sampling (BlinkDL's, from early RWKV releases): drop tokens whose probability is below
``a * p_max ** 2``, so a confident model samples from fewer tokens than an unsure one."""

from __future__ import annotations

import torch
from hydra.core.config_store import ConfigStore

from rwkvkit.hookspecs import hookimpl
from rwkvkit.interfaces import SampleContext, Sampler


class TopASampler(Sampler):
    name = "top_a"

    def __init__(self, a: float = 0.2, temperature: float = 1.0) -> None:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"top_a option a={a!r}: expected a number in [0, 1]")
        self.a, self.temperature = a, temperature

    def sample(self, logits: torch.Tensor, ctx: SampleContext) -> int:
        probs = torch.softmax(logits.double() / max(self.temperature, 1e-6), dim=-1)
        kept = torch.where(probs >= self.a * probs.max() ** 2, probs, 0.0)
        return int(torch.multinomial(kept, 1, generator=ctx.generator)[0])


@hookimpl
def register_samplers(register):
    register(TopASampler)


# `rwkvkit run sampling=top_a` (listed by `rwkvkit run --help`); options stay overridable:
# `rwkvkit run sampling=top_a sampling.options.a=0.3`
ConfigStore.instance().store(group="sampling", name="top_a", node={"name": "top_a", "options": {"a": 0.2}})
