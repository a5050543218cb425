"""The int8 quantization cache (plugins/int8_backend.py): an entry that is valid safetensors but
does not fit its matrix is rebuilt, not trusted; a cache that cannot be written only costs time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from rwkvkit import RWKV
from rwkvkit.plugins import int8_backend

ROWS = 3  # a wrong shape smaller than any real matrix: the old code indexed it and failed later


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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
def test_an_entry_that_does_not_fit_its_matrix_is_rebuilt(model_paths, private_cache, damage):
    first, _ = RWKV(model_paths["tiny"], "cpu fp32i8").forward([1, 2, 3], None)
    entries = sorted((private_cache / "int8").glob("*.safetensors"))
    good = {entry: load_file(str(entry)) for entry in entries}
    for entry, data in good.items():
        save_file(damage(data["q"], data["scale"]), str(entry))

    again, _ = RWKV(model_paths["tiny"], "cpu fp32i8").forward([1, 2, 3], None)

    assert torch.equal(first, again)
    for entry, data in good.items():
        rebuilt = load_file(str(entry))
        assert rebuilt.keys() == {"q", "scale"}
        assert torch.equal(rebuilt["q"], data["q"]) and torch.equal(rebuilt["scale"], data["scale"])
    assert sorted((private_cache / "int8").iterdir()) == entries  # no temporaries left


def test_an_unwritable_cache_warns_once_and_still_quantizes(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RWKVKIT_CACHE", str(blocker))
    w = torch.randn(8, 16)
    with pytest.warns(RuntimeWarning, match=r"int8: cannot write the quantization cache in .*not-a-folder/int8 \(.*\); quantizing again on every load"):
        weight = int8_backend.quantize_cached(w)
    torch.testing.assert_close(weight.dequantize(), w, rtol=0, atol=float(w.abs().max()) / 254 * 1.001)
