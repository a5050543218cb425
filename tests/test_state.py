"""State: clone/deepcopy/to, batching, save/load with the model fingerprint."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import API_DEMO
from rwkvkit import RWKV, State, StateError
from rwkvkit.state import LayerState
from rwkvkit.testing import make_checkpoint


@pytest.fixture(scope="module")
def model(model_paths) -> RWKV:
    return RWKV(model_paths["tiny"], "cpu fp32")


def assert_same(a: State, b: State) -> None:
    assert a.fingerprint == b.fingerprint
    for x, y in zip(a.layers, b.layers):
        assert all(torch.equal(p, q) for p, q in zip(x.tensors(), y.tensors()))


def test_zero_state_shapes_and_dtypes(model):
    s = model.zero_state(batch_size=3)
    layer = s.layers[0]
    assert layer.att_x_prev.shape == (3, 128) and layer.ffn_x_prev.shape == (3, 128)
    assert layer.att_kv.shape == (3, 2, 64, 64) and layer.att_kv.dtype == torch.float32
    assert len(s.layers) == 2 and s.batch_size == 3


def test_clone_deepcopy_to_are_independent_copies(model):
    _, s = model.forward(API_DEMO, None)
    for copied in (s.clone(), copy.deepcopy(s), s.to("cpu")):
        assert_same(copied, s)
    c = s.clone()
    c.layers[0].att_kv.add_(1)
    assert not torch.equal(c.layers[0].att_kv, s.layers[0].att_kv)


def test_cat_and_index(model):
    _, a = model.forward([1, 2], None)
    _, b = model.forward([3, 4], None)
    both = State.cat([a, b])
    assert both.batch_size == 2
    assert_same(both[0], a)
    assert_same(both[1:], b)


def test_save_load_roundtrip_continues_identically(model, tmp_path):
    _, s = model.forward(API_DEMO, None)
    s.save(tmp_path / "s.safetensors")
    loaded = State.load(tmp_path / "s.safetensors", model)
    assert_same(loaded, s)
    a, _ = model.forward([7], s)
    b, _ = model.forward([7], loaded)
    assert torch.equal(a, b)


def test_state_whose_tensors_share_memory_saves(model, tmp_path):
    """A backend (or a user) may hand back views of one buffer; the file gets independent copies."""
    _, s = model.forward(API_DEMO, None)
    layer = s.layers[0]
    both = torch.stack([layer.att_x_prev, layer.ffn_x_prev])
    s.layers[0] = LayerState(both[0], layer.att_kv, both[1])
    s.save(tmp_path / "s.safetensors")
    assert_same(State.load(tmp_path / "s.safetensors", model), s)


def test_bf16_state_roundtrip(model_paths, tmp_path):
    m = RWKV(model_paths["tiny"], "cpu bf16")
    _, s = m.forward(API_DEMO, None)
    s.save(tmp_path / "s.st")
    assert_same(State.load(tmp_path / "s.st", m), s)


def test_state_of_another_model_with_the_same_shapes_is_refused(model, model_paths, tmp_path):
    twin = RWKV(make_checkpoint(tmp_path / "twin.pth", 2, 128, 2048, seed=99), "cpu fp32")
    assert twin.spec == model.spec and twin.fingerprint != model.fingerprint
    _, s = twin.forward([1], None)
    s.save(tmp_path / "twin.safetensors")
    with pytest.raises(StateError, match="belongs to another model"):
        State.load(tmp_path / "twin.safetensors", model)


def test_bad_state_files(model, tmp_path):
    with pytest.raises(StateError, match="state file not found"):
        State.load(tmp_path / "missing", model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"garbage")
    with pytest.raises(StateError, match="not a readable rwkvkit state file"):
        State.load(junk, model)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(StateError, match="not an rwkvkit state file"):
        State.load(other, model)


def test_failed_save_keeps_the_previous_file(model, tmp_path, monkeypatch):
    _, s = model.forward([1], None)
    target = tmp_path / "s.safetensors"
    target.write_bytes(b"previous")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(StateError, match=f"cannot save the state to {target}: No space left on device"):
        s.save(target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
