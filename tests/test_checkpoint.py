"""Checkpoint loading: formats, spec derivation, and a clear CheckpointError for every bad file."""

from __future__ import annotations

import pickle

import pytest
import torch

from rwkvkit import RWKV, CheckpointError
from rwkvkit.checkpoint import expected_shapes, load_checkpoint
from rwkvkit.testing import make_spec, random_checkpoint, save_checkpoint

SPEC = make_spec(n_layer=2, n_embd=128, vocab_size=300)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return random_checkpoint(SPEC, seed=3)


def test_spec_is_derived_from_shapes(tmp_path, tensors):
    ckpt = load_checkpoint(save_checkpoint(tensors, tmp_path / "m.pth"))
    assert ckpt.spec == SPEC
    assert (SPEC.n_head, SPEC.head_size, SPEC.dim_ffn) == (2, 64, 512)
    assert make_spec(12, 768, 65536).lora_w == 64 and make_spec(12, 768, 65536).lora_g == 128  # World 0.1B


def test_random_checkpoint_has_the_real_key_layout(tensors):
    assert set(tensors) == set(expected_shapes(SPEC))
    assert all(tuple(t.shape) == expected_shapes(SPEC)[k] for k, t in tensors.items())
    assert {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} <= set(tensors)


def test_pth_suffix_is_optional_and_safetensors_and_bf16_files_load(tmp_path, tensors):
    pth = save_checkpoint(tensors, tmp_path / "m.pth")
    st = save_checkpoint(tensors, tmp_path / "s.safetensors")
    bf16 = save_checkpoint({k: v.bfloat16() for k, v in tensors.items()}, tmp_path / "b.pth")
    a, _ = RWKV(str(pth.with_suffix("")), "cpu fp32").forward([1, 2, 3], None)
    b, _ = RWKV(str(st.with_suffix("")), "cpu fp32").forward([1, 2, 3], None)
    c, _ = RWKV(bf16, "cpu fp32").forward([1, 2, 3], None)
    assert torch.equal(a, b)
    assert float((a - c).abs().max()) < 0.05 * float(a.abs().max())  # bf16 weights: ~3 significant digits


def test_layer0_value_residual_weights_may_be_absent(tmp_path, tensors):
    trimmed = {k: v for k, v in tensors.items() if not k.startswith(("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"))}
    a, _ = RWKV(save_checkpoint(tensors, tmp_path / "full.pth"), "cpu fp32").forward([5, 6], None)
    b, _ = RWKV(save_checkpoint(trimmed, tmp_path / "trim.pth"), "cpu fp32").forward([5, 6], None)
    assert torch.equal(a, b)


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    return str(info.value)


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope")
    assert "checkpoint not found" in msg and "nope.pth" in msg and "nope.safetensors" in msg


def test_directory(tmp_path):
    assert "is a directory" in _error(tmp_path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, tensors, suffix):
    path = save_checkpoint(tensors, tmp_path / f"m{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _error(path)
    assert str(path) in msg and "not a readable" in msg


def test_garbage_bytes(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x00not a checkpoint" * 100)
    assert "not a readable" in _error(path)


def test_pickle_of_something_else(tmp_path):
    lst = tmp_path / "list.pth"
    torch.save([1, 2, 3], lst)
    assert "expected a dict of name -> tensor, got list" in _error(lst)
    legacy = tmp_path / "plain.pth"
    legacy.write_bytes(pickle.dumps({"emb.weight": [1.0]}))
    assert "not a readable" in _error(legacy)


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))


def test_pickle_with_code_is_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, path)
    assert "not a readable" in _error(path)
    assert "should never run" not in capsys.readouterr().out


def test_not_rwkv(tmp_path):
    path = save_checkpoint({"weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    assert "not an RWKV checkpoint" in _error(path)


@pytest.mark.parametrize(
    "title, keys",
    [
        ("RWKV-4 'v4'", ["blocks.0.att.time_first", "blocks.0.att.time_decay"]),
        ("RWKV-5.2 (Eagle) 'x052'", ["blocks.0.att.time_faaaa", "blocks.0.att.ln_x.weight"]),
        ("RWKV-6 (Finch) 'x060'", ["blocks.0.att.time_maa_x", "blocks.0.att.time_faaaa"]),
    ],
)
def test_older_generations_are_recognised_and_named_in_errors(tmp_path, title, keys):
    """A damaged file of an older generation is detected as that generation (tests/test_architectures.py runs whole ones)."""
    fake = {"emb.weight": torch.zeros(10, 8), **{k: torch.zeros(8) for k in keys}}
    msg = _error(save_checkpoint(fake, tmp_path / "old.pth"))
    assert title in msg


def _broken(tmp_path, tensors, edit) -> str:
    t = dict(tensors)
    edit(t)
    return _error(save_checkpoint(t, tmp_path / "broken.pth"))


def test_missing_key_is_named(tmp_path, tensors):
    msg = _broken(tmp_path, tensors, lambda t: t.pop("blocks.1.att.k_a"))
    assert "missing key 'blocks.1.att.k_a'" in msg and "broken.pth" in msg


def test_wrong_shape_is_named(tmp_path, tensors):
    msg = _broken(tmp_path, tensors, lambda t: t.__setitem__("blocks.1.ffn.value.weight", torch.zeros(128, 100)))
    assert "'blocks.1.ffn.value.weight' has shape [128, 100]; expected [128, 512]" in msg


def test_wrong_dtype_is_named(tmp_path, tensors):
    msg = _broken(tmp_path, tensors, lambda t: t.__setitem__("ln_out.bias", torch.zeros(128, dtype=torch.int32)))
    assert "'ln_out.bias' has dtype torch.int32" in msg


def test_unexpected_key_is_named(tmp_path, tensors):
    msg = _broken(tmp_path, tensors, lambda t: t.__setitem__("blocks.0.ffn.s_emb.weight", torch.zeros(300, 32)))
    assert "unexpected key(s) 'blocks.0.ffn.s_emb.weight'" in msg


def test_bad_r_k(tmp_path, tensors):
    msg = _broken(tmp_path, tensors, lambda t: t.__setitem__("blocks.0.att.r_k", torch.zeros(3, 64)))
    assert "'blocks.0.att.r_k' has shape [3, 64]; expected [n_head, head_size] with product" in msg
