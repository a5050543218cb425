"""PromptCache: prefix states equal a fresh forward's, longest-prefix lookup, LRU within a byte
bound, one model per cache, copies on the device asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rwkvkit.prompt_cache as prompt_cache
from rwkvkit import RWKV, InputError, StateError
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.state import State
from rwkvkit.testing import make_checkpoint

PROMPT = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[RWKV, RWKV]:
    """Two small models (different seeds, so different fingerprints), on the reference backend."""
    root = tmp_path_factory.mktemp("cache-models")
    return tuple(RWKV(make_checkpoint(root / f"m{seed}.pth", seed=seed), "cpu fp32", backend="torch") for seed in (0, 1))


@pytest.fixture(scope="module")
def model(models) -> RWKV:
    return models[0]


def run(model: RWKV, ids: list[int]) -> tuple[torch.Tensor, State]:
    return model.forward(ids, None)


def stored(model: RWKV, cache: PromptCache, ids: list[int]) -> tuple[torch.Tensor, State]:
    logits, state = run(model, ids)
    cache.store(ids, state, logits)
    return logits, state


def entry_bytes(model: RWKV, length: int) -> int:
    """What an entry of ``length`` tokens occupies: its state tensors, float32 logits, int64 ids."""
    _, state = run(model, [1])
    return sum(t.nbytes for layer in state.layers for t in layer.tensors()) + 4 * model.spec.vocab_size + 8 * length


def assert_same_state(a: State, b: State) -> None:
    assert a.fingerprint == b.fingerprint and len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert all(torch.equal(p, q) for p, q in zip(x.tensors(), y.tensors()))


def test_continuing_from_a_hit_matches_a_full_forward(model):
    """The tolerance is the chunked-prefill one (test_forward): a cached prefix splits the prompt
    into two forward calls, the same math over GEMMs of other row counts, whose fp32 sums differ
    in the last bits; 2e-5 of the largest logit bounds that drift through the layers."""
    cache = PromptCache(1 << 30)
    _, prefix_state = stored(model, cache, PROMPT[:10])
    hit = cache.lookup(PROMPT)
    assert hit is not None and hit.length == 10
    assert_same_state(hit.state, prefix_state)
    assert_same_state(hit.state, run(model, PROMPT[:10])[1])  # a fresh forward's prefix state
    cont, _ = model.forward(PROMPT[10:], hit.state)
    full, _ = run(model, PROMPT)
    torch.testing.assert_close(cont, full, rtol=0, atol=2e-5 * float(full.abs().max()))


def test_exact_hit_returns_the_stored_logits(model):
    cache = PromptCache(1 << 30)
    logits, state = stored(model, cache, PROMPT)
    hit = cache.lookup(PROMPT)
    assert hit.length == len(PROMPT) and torch.equal(hit.logits, logits) and hit.logits.dtype == torch.float32
    assert_same_state(hit.state, state)
    assert hit.state.is_produced()  # a model's output stays marked: adopt_state skips the finite scan


def test_longest_prefix_is_chosen_among_several(model):
    cache = PromptCache(1 << 30)
    for length in (3, 12, 7):
        stored(model, cache, PROMPT[:length])
    stored(model, cache, PROMPT[:10] + [PROMPT[10] ^ 1] + PROMPT[11:])  # shares 10 tokens, then differs
    assert cache.lookup(PROMPT).length == 12
    assert cache.lookup(PROMPT[:11]).length == 7
    assert cache.lookup(PROMPT[:5]).length == 3
    assert cache.lookup(np.array(PROMPT[:12])).length == 12  # numpy and tensor ids alike
    assert cache.lookup(torch.tensor(PROMPT[:12])).length == 12


def test_no_prefix_match_returns_none(model):
    cache = PromptCache(1 << 30)
    stored(model, cache, PROMPT[:5])
    assert cache.lookup([PROMPT[0] ^ 1] + PROMPT[1:]) is None
    assert cache.lookup(PROMPT[:4]) is None  # shorter than every entry
    assert cache.lookup([]) is None
    s = cache.stats()
    assert (s.hits, s.misses, s.entries) == (0, 3, 1)


def test_keys_compare_real_ids_not_only_hashes(model, monkeypatch):
    monkeypatch.setattr(prompt_cache, "_prefix_hashes", lambda ids: np.zeros(len(ids), np.uint64))  # every prefix collides
    cache = PromptCache(1 << 30)
    stored(model, cache, [1, 2, 3])
    stored(model, cache, [1, 2, 4])
    assert cache.lookup([1, 2, 5]) is None
    assert torch.equal(cache.lookup([1, 2, 4, 9]).logits, run(model, [1, 2, 4])[0])


def test_lru_eviction_order_and_byte_bound(model):
    size = entry_bytes(model, 4)
    cache = PromptCache(int(2.5 * size))
    a, b, c = ([i, i + 1, i + 2, i + 3] for i in (10, 20, 30))
    stored(model, cache, a)
    stored(model, cache, b)
    assert cache.lookup(a).length == 4  # a is now the most recently used: b goes first
    stored(model, cache, c)
    assert cache.lookup(b) is None and cache.lookup(a) is not None and cache.lookup(c) is not None
    s = cache.stats()
    assert (s.entries, s.bytes, s.evictions) == (2, 2 * size, 1)
    measured = sum(
        sum(t.untyped_storage().nbytes() for layer in e.state.layers for t in layer.tensors()) + e.logits.untyped_storage().nbytes() + len(e.key)
        for e in cache._entries.values()
    )
    assert measured == s.bytes <= cache.max_bytes
    stored(model, cache, a)  # storing cached ids again refreshes them: c goes next
    stored(model, cache, b)
    assert cache.lookup(c) is None and cache.lookup(a) is not None and cache.stats().evictions == 2


def test_an_entry_larger_than_the_bound_is_skipped(model):
    cache = PromptCache(entry_bytes(model, 2))
    stored(model, cache, PROMPT[:2])
    stored(model, cache, PROMPT)  # 14 more ids of 8 bytes: too large, and evicts nothing
    assert cache.stats().entries == 1 and cache.lookup(PROMPT).length == 2
    empty = PromptCache(0)
    stored(model, empty, PROMPT[:2])
    assert empty.stats().entries == 0 and empty.lookup(PROMPT) is None


def test_another_models_state_is_refused(models):
    a, b = models
    cache = PromptCache(1 << 30)
    stored(a, cache, PROMPT[:3])
    with pytest.raises(StateError, match="another model"):
        stored(b, cache, PROMPT[:3])
    bound = PromptCache(1 << 30, fingerprint=b.fingerprint)
    with pytest.raises(StateError, match="another model"):
        stored(a, bound, PROMPT[:3])


def test_hits_are_copies_the_caller_may_edit(model):
    cache = PromptCache(1 << 30)
    logits, state = stored(model, cache, PROMPT[:6])
    with torch.inference_mode():  # the caller keeps using its own tensors (forward's are inference tensors)
        state.layers[0].att_kv.add_(1)
        logits.add_(1)
    first = cache.lookup(PROMPT[:6])
    first.state.layers[0].att_kv.zero_()
    first.logits.zero_()
    second = cache.lookup(PROMPT[:6])
    assert_same_state(second.state, run(model, PROMPT[:6])[1])
    assert torch.equal(second.logits, run(model, PROMPT[:6])[0])


def test_bad_input_is_refused(model):
    logits, state = run(model, PROMPT[:3])
    cache = PromptCache(1 << 30)
    two = State.cat([state, state])
    with pytest.raises(StateError, match="batch size 2"):
        cache.store(PROMPT[:3], two, logits)
    with pytest.raises(InputError, match="float32"):
        cache.store(PROMPT[:3], state, logits.half())
    with pytest.raises(InputError, match="float32"):
        cache.store(PROMPT[:3], state, logits[None])
    with pytest.raises(InputError, match="empty"):
        cache.store([], state, logits)
    with pytest.raises(InputError, match="integer"):
        cache.lookup([1.5, 2.0])
    with pytest.raises(InputError, match="integer"):
        cache.lookup([[1, 2]])
    with pytest.raises(InputError, match="sequence"):
        cache.lookup("abc")
    with pytest.raises(StateError, match="State"):
        cache.store(PROMPT[:3], "state", logits)
    assert cache.fingerprint is None  # a refused store binds the cache to no model
    with pytest.raises(ValueError, match="max_bytes"):
        PromptCache(-1)


def test_clear_and_stats(model):
    cache = PromptCache(1 << 30)
    stored(model, cache, PROMPT[:3])
    held = cache.stats().bytes
    cache.lookup(PROMPT)
    cache.lookup([PROMPT[0] ^ 1])
    cache.clear()  # the counters, the peak among them, stay
    assert held > 0 and cache.stats() == prompt_cache.CacheStats(hits=1, misses=1, entries=0, bytes=0, evictions=0, peak_bytes=held)
    assert cache.lookup(PROMPT) is None


def test_device_placement_cpu(model):
    cache = PromptCache(1 << 30, device="cpu")
    stored(model, cache, PROMPT[:3])
    for device in (None, "cpu"):
        hit = cache.lookup(PROMPT, device=device)
        assert all(t.device.type == "cpu" for layer in hit.state.layers for t in layer.tensors()) and hit.logits.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_placement_cuda(model):
    cache = PromptCache(1 << 30, device="cuda")
    logits, _ = stored(model, cache, PROMPT[:10])
    assert cache.lookup(PROMPT).logits.device.type == "cuda"  # kept where the cache lives
    hit = cache.lookup(PROMPT, device="cpu")
    assert hit.logits.device.type == "cpu" and torch.equal(hit.logits.cpu(), logits)
    on_gpu = cache.lookup(PROMPT)
    cont, _ = model.forward(PROMPT[10:], on_gpu.state)  # adopt_state moves a GPU state to this CPU model
    ref, _ = model.forward(PROMPT[10:], hit.state)
    assert torch.equal(cont, ref)
