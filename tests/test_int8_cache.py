"""The int8 quantization cache (plugins/int8_cache.py): one file per model and stage, keyed by the
checkpoint's identity; a weight stored in it that does not fit its matrix is quantized again, not
trusted; least recently used entries go first beyond the size limit; a cache that cannot be
written only costs time."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from rwkvkit import RWKV, RwkvkitError
from rwkvkit.plugins import int8_cache
from rwkvkit.testing import make_checkpoint, make_spec, random_checkpoint, save_checkpoint

ROWS = 3  # a wrong shape smaller than any real matrix: the old code indexed it and failed later


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(cache):
    return sorted((cache / "int8").glob("*.safetensors"))


def logits(path, strategy="cpu fp32i8"):
    return RWKV(path, strategy).forward([1, 2, 3], None)[0]


def forbid_quantizing(monkeypatch):
    def no_quantizing(source):
        raise AssertionError(f"quantized {source.key} again instead of reading the cache")

    monkeypatch.setattr(int8_cache, "quantize_source", no_quantizing)


def wrong_shape(q, scale):
    return {"q": q[:ROWS, :5].contiguous(), "scale": scale[:ROWS].contiguous()}


def float_codes(q, scale):
    return {"q": q.float(), "scale": scale}


def scale_too_short(q, scale):
    return {"q": q, "scale": scale[:-1].contiguous()}


def nan_scale(q, scale):
    return {"q": q, "scale": torch.full_like(scale, float("nan"))}


def negative_scale(q, scale):
    return {"q": q, "scale": -scale}


def missing_scale(q, scale):
    return {"q": q}


def extra_tensor(q, scale):
    return {"q": q, "scale": scale, "other": scale.clone()}


@pytest.mark.parametrize("damage", [wrong_shape, float_codes, scale_too_short, nan_scale, negative_scale, missing_scale, extra_tensor])
def test_a_stored_weight_that_does_not_fit_its_matrix_is_quantized_again(model_paths, private_cache, damage):
    first = logits(model_paths["tiny"])
    (entry,) = entries(private_cache)
    good = load(entry.read_bytes())  # a copy in memory: the entry is overwritten in place below
    keys = sorted({name.rsplit(".", 1)[0] for name in good})
    damaged = {f"{key}.{part}": t for key in keys for part, t in damage(good[f"{key}.q"], good[f"{key}.scale"]).items()}
    save_file(damaged, str(entry))

    assert torch.equal(first, logits(model_paths["tiny"]))
    rebuilt = load_file(str(entry))
    assert rebuilt.keys() == good.keys()
    assert all(torch.equal(rebuilt[name], good[name]) for name in good)
    assert entries(private_cache) == [entry] and os.listdir(private_cache / "int8") == [entry.name]  # no temporaries left


def test_one_file_per_model_and_stage_shared_by_fp32i8_and_bf16i8(model_paths, private_cache, monkeypatch):
    logits(model_paths["tiny"])
    (entry,) = entries(private_cache)
    assert entry.name.startswith("tiny-0-2-")
    names = load_file(str(entry)).keys()
    assert {"emb.weight|ln0 folded, eps 1e-05.q", "head.weight.scale", "blocks.1.ffn.value.weight.q"} <= names and len(names) == 2 * (2 + 2 * 6)
    forbid_quantizing(monkeypatch)
    logits(model_paths["tiny"], "cpu bf16i8")  # the codes do not depend on the activation dtype
    assert entries(private_cache) == [entry]


def test_a_split_strategy_has_an_entry_per_int8_stage(model_paths, private_cache):
    logits(model_paths["tiny"], "cpu fp32i8 *1 -> cpu bf16i8")
    names = [entry.name.rsplit("-", 1)[0] for entry in entries(private_cache)]
    assert names == ["tiny-0-1", "tiny-1-2"]


def test_a_checkpoint_whose_matrices_changed_gets_a_new_entry(tmp_path, private_cache, monkeypatch):
    """Same path, size and small tensors (so the same fingerprint); only the head differs."""
    tensors = random_checkpoint(make_spec(2, 128, 512), seed=3)
    path = save_checkpoint(tensors, tmp_path / "m.pth")
    logits(path)
    tensors["head.weight"] = tensors["head.weight"].flip(0).contiguous()
    save_checkpoint(tensors, path)
    os.utime(path, ns=(1, 1))  # a modification time no earlier load saw

    changed = logits(path)
    assert len(entries(private_cache)) == 2
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "fresh"))
    assert torch.equal(changed, logits(path))


def test_least_recently_used_entries_are_evicted_beyond_the_limit(tmp_path, private_cache, monkeypatch):
    paths = [make_checkpoint(tmp_path / f"{name}.pth", vocab_size=4096, seed=i) for i, name in enumerate("abc")]
    logits(paths[0])
    size = entries(private_cache)[0].stat().st_size
    monkeypatch.setenv("RWKVKIT_INT8_CACHE_MB", str(2.5 * size / 2**20))  # room for two entries
    logits(paths[1])
    os.utime(entries(private_cache)[1], (1, 1))  # b long unused...
    logits(paths[0])  # ...while a is used again
    logits(paths[2])
    assert [entry.name[0] for entry in entries(private_cache)] == ["a", "c"]


def test_a_limit_of_zero_keeps_only_the_entry_in_use_and_old_layout_files_are_removed(model_paths, private_cache, monkeypatch):
    old = private_cache / "int8" / f"{'0' * 32}.safetensors"  # one matrix of the per-matrix layout
    old.parent.mkdir(parents=True)
    save_file({"q": torch.zeros(2, 2, dtype=torch.int8), "scale": torch.ones(2)}, str(old))
    monkeypatch.setenv("RWKVKIT_INT8_CACHE_MB", "0")
    logits(model_paths["tiny"])
    logits(model_paths["world"])
    assert [entry.name.split("-")[0] for entry in entries(private_cache)] == ["world"]


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_size_limit_is_named_before_quantizing(model_paths, monkeypatch, value):
    monkeypatch.setenv("RWKVKIT_INT8_CACHE_MB", value)
    forbid_quantizing(monkeypatch)
    with pytest.raises(RwkvkitError, match=rf"RWKVKIT_INT8_CACHE_MB='{value}': expected a size in megabytes \(a number >= 0\)"):
        logits(model_paths["tiny"])


def test_an_unwritable_cache_warns_once_and_still_quantizes(model_paths, tmp_path, monkeypatch):
    expected = logits(model_paths["tiny"])
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RWKVKIT_CACHE", str(blocker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = logits(model_paths["tiny"])
    (message,) = [str(w.message) for w in caught if "quantization cache" in str(w.message)]
    assert re.fullmatch(rf"int8: cannot write the quantization cache in {blocker}/int8 \(.*\); quantizing again on every load", message)
    assert torch.equal(expected, again)


def test_a_derived_weight_is_cached_per_derivation(model_paths, private_cache, monkeypatch):
    """The embedding is cached with ``ln0`` folded in at the architecture's epsilon: a load under
    another epsilon must not get the first one's codes (it did, when entries were keyed by the
    checkpoint key alone), and gets what a fresh quantization gives."""
    from rwkvkit.models import rwkv7

    first = RWKV(model_paths["tiny"], "cpu fp32i8").emb
    monkeypatch.setattr(rwkv7, "LN_EPS", 0.5)
    cached = RWKV(model_paths["tiny"], "cpu fp32i8").emb
    for path in entries(private_cache):
        path.unlink()
    fresh = RWKV(model_paths["tiny"], "cpu fp32i8").emb
    assert not torch.equal(first.q, cached.q)
    assert torch.equal(cached.q, fresh.q) and torch.equal(cached.scale, fresh.scale)
