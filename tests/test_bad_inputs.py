"""Crafted or mistaken input into the model, its states, checkpoints and native kernels: each case
gives a clear RwkvkitError (or the right result), never a crash, a poisoned model or silent garbage.

Cases that crashed the process before they were fixed run in a subprocess, so that a regression
fails its test instead of killing pytest.
"""

from __future__ import annotations

import copy
import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rwkvkit import RWKV, InputError, State, StateError
from rwkvkit.checkpoint import load_checkpoint
from rwkvkit.errors import CheckpointError, StrategyError, TokenizerError
from rwkvkit.models import rwkv7
from rwkvkit.native import cpu
from rwkvkit.plugins.rwkv_world import RwkvWorldTokenizer
from rwkvkit.state import STATE_FORMAT, LayerState
from rwkvkit.strategy import parse_strategy

FUZZ = Path(__file__).with_name("fuzz_forward.py")


@pytest.fixture(scope="module")
def model(model_paths) -> RWKV:
    return RWKV(model_paths["tiny"], "cpu fp32")


def run_isolated(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (argv[1:] = args); a segfault shows up as rc < 0."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=600)


# ---- states: shapes are checked before any kernel sees them


def test_crafted_state_file_with_the_right_fingerprint_is_refused(model_paths, model, tmp_path):
    """Used to segfault: att_kv [1, 1, 2, 2] on a 2-head, 64-wide model reached the native decode."""
    _, good = model.forward([1], None)
    data = {f"layers.{i}.{name}": t.clone() for i, layer in enumerate(good.layers) for name, t in zip(("att_x_prev", "att_kv", "ffn_x_prev"), layer.tensors())}
    data["layers.0.att_kv"] = torch.zeros(1, 1, 2, 2)
    path = tmp_path / "crafted.st"
    save_file(data, str(path), metadata={"format": STATE_FORMAT, "fingerprint": model.fingerprint})
    proc = run_isolated(
        """
        import sys
        from rwkvkit import RWKV, State, StateError
        model = RWKV(sys.argv[1], "cpu fp32")
        try:
            model.forward([2], State.load(sys.argv[2], model))
        except StateError as exc:
            print(exc)
        """,
        str(model_paths["tiny"]),
        str(path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: state layer 0 att_kv has shape [1, 1, 2, 2]; expected [B, 2, 64, 64] with B >= 1 (the model's dimensions)"


def test_state_edited_in_memory_is_refused_and_does_not_poison_the_model(model_paths):
    """Used to abort with 'double free or corruption'; and a bad state first seen by the CPU
    backend fixed its head count for every later call (logits off by 0.8)."""
    proc = run_isolated(
        """
        import sys, torch
        from rwkvkit import RWKV, StateError
        model = RWKV(sys.argv[1], "cpu fp32")
        fresh = RWKV(sys.argv[1], "cpu fp32")
        _, state = model.forward([1, 2], None)
        state.layers[0].att_kv = torch.zeros(1, 1, 1, 1)
        for tokens in ([3], [3, 4]):  # decode and prefill paths
            try:
                model.forward(tokens, state)
                print("accepted")
            except StateError as exc:
                print(exc)
        _, good = model.forward([1, 2], None)
        assert torch.equal(model.forward([3], good)[0], fresh.forward([3], fresh.forward([1, 2], None)[1])[0])
        print("unpoisoned")
        """,
        str(model_paths["tiny"]),
    )
    assert proc.returncode == 0, proc.stderr
    message = "state layer 0 att_kv has shape [1, 1, 1, 1]; expected [B, 2, 64, 64] with B >= 1 (the model's dimensions)"
    assert proc.stdout.splitlines() == [message, message, "unpoisoned"]


def _edited(model: RWKV, layer: int, name: str, value) -> State:
    _, state = model.forward([1], None)
    setattr(state.layers[layer], name, value)
    return state


@pytest.mark.parametrize(
    "layer, name, value, message",
    [
        (1, "att_x_prev", torch.zeros(1, 64), r"state layer 1 att_x_prev has shape \[1, 64\]; expected \[B, 128\]"),
        (0, "ffn_x_prev", torch.zeros(128), r"state layer 0 ffn_x_prev has shape \[128\]; expected \[B, 128\]"),
        (1, "att_kv", torch.zeros(2, 2, 64, 64), "state layer 1 att_kv has batch size 2 but earlier tensors have 1"),
        (0, "att_kv", torch.zeros(0, 2, 64, 64), r"state layer 0 att_kv has shape \[0, 2, 64, 64\]; expected .* B >= 1"),
        (0, "att_x_prev", torch.zeros(1, 128, dtype=torch.long), "state layer 0 att_x_prev is a torch.strided torch.int64 tensor"),
        (0, "att_x_prev", torch.zeros(1, 128, dtype=torch.complex64), "torch.complex64 tensor on cpu; expected a dense floating-point"),
        (1, "att_kv", [[0.0]], "state layer 1 att_kv is a list; expected a tensor"),
        (1, "att_kv", torch.full((1, 2, 64, 64), float("nan")), "state layer 1 att_kv holds non-finite values"),
        (0, "ffn_x_prev", torch.full((1, 128), float("inf")), "state layer 0 ffn_x_prev holds non-finite values"),
    ],
)
def test_bad_state_tensors_are_refused(model, layer, name, value, message):
    with pytest.raises(StateError, match=message):
        model.forward([2], _edited(model, layer, name, value))


def test_bad_state_objects_are_refused(model):
    _, state = model.forward([1], None)
    with pytest.raises(StateError, match="state must be an rwkvkit State .* got list"):
        model.forward([2], [t for layer in state.layers for t in layer.tensors()])
    with pytest.raises(StateError, match="state has 1 layers; model has 2"):
        model.forward([2], State(state.layers[:1], state.fingerprint))
    with pytest.raises(StateError, match="state layer 1 is a tuple; expected a LayerState"):
        model.forward([2], State([state.layers[0], tuple(state.layers[1].tensors())], state.fingerprint))


@pytest.mark.parametrize("name, shape", [("att_kv", (1, 1, 2, 2)), ("att_x_prev", (2, 128)), ("ffn_x_prev", (1, 64))])
def test_a_model_made_state_resized_in_place_is_refused(model, name, shape):
    """A state the model made skips the value scan; its tensors' shapes are still checked, since
    an in-place resize keeps the very tensor objects the model made (torch allows it on these
    inference tensors inside inference mode)."""
    _, state = model.forward([1], None)
    with torch.inference_mode():
        getattr(state.layers[1], name).resize_(*shape)
    with pytest.raises(StateError, match=f"state layer 1 {name} has (shape|batch size)"):
        model.forward([2], state)


def test_a_state_in_another_precision_or_layout_is_accepted(model):
    """float64 and non-contiguous tensors holding the right values give the same logits."""
    _, state = model.forward([1, 2], None)
    expected, _ = model.forward([3], state)
    converted = State([LayerState(*(t.double() for t in layer.tensors())) for layer in state.layers], state.fingerprint)
    kv = state.layers[0].att_kv
    converted.layers[0].att_kv = kv.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not converted.layers[0].att_kv.is_contiguous()
    torch.testing.assert_close(model.forward([3], converted)[0], expected)


def test_value_scan_is_skipped_only_for_untouched_states(model):
    """A state the model made is trusted as finite; replacing any tensor brings the scan back."""
    _, state = model.forward([1], None)
    assert state.is_produced()
    state.layers[1].ffn_x_prev = state.layers[1].ffn_x_prev.clone()
    assert not state.is_produced()
    assert not state.clone().is_produced()


def test_a_models_own_state_is_adopted_as_it_is_and_anything_else_converted(model, model_paths):
    """adopt_state skips its per-tensor copies (a cost per decoded token) only for the very tensors
    this model produced: a deep copy keeps that, a tensor replaced or made non-contiguous in place,
    or a state another model of the same checkpoint produced (same fingerprint, other dtype), does not."""
    _, state = model.forward([1, 2], None)
    assert model.adopt_state(state) is state
    assert model.adopt_state(copy.deepcopy(state)) is not state
    deep = copy.deepcopy(state)
    assert model.adopt_state(deep) is deep  # a deep copy keeps the model's mark and values

    replaced = copy.copy(state)
    replaced.layers = [copy.copy(layer) for layer in state.layers]
    replaced.layers[0].att_x_prev = state.layers[0].att_x_prev.double()
    adopted = model.adopt_state(replaced)
    assert adopted is not replaced and adopted.layers[0].att_x_prev.dtype == torch.float32

    strided = copy.deepcopy(state)
    kv = strided.layers[1].att_kv
    kv.as_strided_(kv.shape, (kv.stride(0), kv.stride(1), 1, kv.shape[-1]))  # the transpose, in place: same shape
    assert not kv.is_contiguous()
    adopted = model.adopt_state(strided)
    assert adopted is not strided and all(t.is_contiguous() for layer in adopted.layers for t in layer.tensors())

    other = RWKV(model_paths["tiny"], "cpu bf16")
    _, foreign = other.forward([1, 2], None)
    assert foreign.fingerprint == state.fingerprint
    adopted = model.adopt_state(foreign)
    assert adopted is not foreign and adopted.layers[0].att_x_prev.dtype == torch.float32
    assert other.adopt_state(foreign) is foreign


def test_random_states_and_tokens_never_crash(model_paths):
    """Property test (hypothesis, in a subprocess): see tests/fuzz_forward.py."""
    proc = subprocess.run([sys.executable, str(FUZZ), str(model_paths["tiny"]), "120"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("fuzz ok"), f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# ---- native entry points check the sizes they are given


def test_native_calls_refuse_wrong_sizes(model):
    assert cpu.library() is not None, "the kernels must build here"
    ops = model.stages[0].ops
    weights = model.stages[0].blocks[0]
    layer = weights.native
    state = model.zero_state(1)
    bad = LayerState(torch.zeros(1, 128), torch.zeros(1, 1, 2, 2), torch.zeros(1, 128))
    with pytest.raises(InputError, match=r"native kernel input att_kv: got torch.float32 \[1, 1, 2, 2\] on cpu, expected \[1, 2, 64, 64\] torch.float32"):
        cpu.decode_stage([layer], torch.zeros(1, 1, 128), None, [bad], torch.float32, 1)
    with pytest.raises(InputError, match=r"native kernel input x: got torch.float32 \[1, 1, 64\]"):
        ops.fused_stage([weights], torch.zeros(1, 1, 64), None, state.layers[:1])
    with pytest.raises(InputError, match=r"native kernel input x_prev: got torch.float32 \[1, 128\]"):  # the channel mix's
        rwkv7.block(ops, weights, torch.zeros(2, 3, 128), None, LayerState(torch.zeros(2, 128), torch.zeros(2, 2, 64, 64), torch.zeros(1, 128)))
    with pytest.raises(InputError, match=r"native kernel input x: got torch.float32 \[1, 64\]"):
        ops.linear(torch.zeros(1, 64), weights.att.key)
    r = torch.zeros(1, 2, 2, 64)
    with pytest.raises(InputError, match=r"native kernel input kv: got torch.float32 \[1, 2, 64, 32\]"):
        ops.wkv(torch.zeros(1, 2, 64, 32), r, r, r, r, r, r)


def test_int8_matrix_vector_kernel_refuses_a_wrong_width(model_paths):
    stage = RWKV(model_paths["tiny"], "cpu fp32i8").stages[0]
    ops, key = stage.ops, stage.blocks[0].att.key
    with pytest.raises(InputError, match=r"native kernel input x: got torch.float32 \[1, 64\]"):
        ops.linear(torch.zeros(1, 64), key)


def test_native_scan_refuses_a_head_size_beyond_its_arrays():
    """The C entry point itself checks N against its fixed per-head arrays (N <= 64)."""
    lib = cpu.library()
    t = torch.zeros(128)
    with pytest.raises(InputError, match="native kernel wkv7_f32 refused its arguments"):
        cpu.checked(lib.wkv7_f32)(1, 1, 1, 128, *(t.data_ptr() for _ in range(8)), 1)


def test_fused_layout_is_prepared_at_load_from_the_checkpoint(model):
    """The native layer is built once per block from the spec, not from the first state seen."""
    for block in model.stages[0].blocks:
        assert (block.native.struct.tm.H, block.native.struct.tm.N) == (model.spec.n_head, model.spec.head_size)


# ---- tokens


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([True, False], "tokens must be integer ids, got bool"),
        ((1, np.bool_(True)), "tokens must be integer ids, got bool"),
        ([1, 2**63], "token id 9223372036854775808 is out of range"),
        ([-(2**70)], "token id -1180591620717411303424 is out of range"),
        (np.array([1, 2**40]), "token id 1099511627776 is out of range"),
    ],
)
def test_bad_token_lists(model, tokens, message):
    with pytest.raises(InputError, match=message):
        model.forward(tokens, None)


# ---- files


def test_saving_a_state_into_a_missing_folder_names_it(model, tmp_path):
    _, state = model.forward([1], None)
    target = tmp_path / "no" / "such" / "s.st"
    with pytest.raises(StateError, match=f"cannot save the state to {target}: folder {target.parent} does not exist"):
        state.save(target)
    with pytest.raises(StateError, match="it is a folder"):
        state.save(tmp_path)


def _resaved(src: Path, dst: Path, **changes) -> Path:
    tensors = torch.load(src, weights_only=True)
    tensors.update(changes)
    torch.save(tensors, dst)
    return dst


def test_one_dimensional_embedding_is_a_checkpoint_error(model_paths, tmp_path):
    emb = torch.load(model_paths["tiny"], weights_only=True)["emb.weight"]
    path = _resaved(model_paths["tiny"], tmp_path / "flat.pth", **{"emb.weight": emb.flatten()})
    with pytest.raises(CheckpointError, match=r"key 'emb.weight' has shape \[262144\]; expected a non-empty 2-D tensor \[vocab_size, n_embd\]"):
        load_checkpoint(path)


def test_legacy_torch_checkpoint_loads(model_paths, model, tmp_path):
    """Files saved before torch 1.6's zip format cannot be memory-mapped: they are read into RAM."""
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(model_paths["tiny"], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(RWKV(legacy, "cpu fp32").forward([5, 6], None)[0], model.forward([5, 6], None)[0])


def test_vocab_file_with_an_absurd_id_names_the_line(tmp_path):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["3000000000 'zz' 2"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(lines) + "\n")
    with pytest.raises(TokenizerError, match=rf"{vocab}:257: malformed vocab line .*id 3000000000 is not in 0..2097151"):
        RwkvWorldTokenizer(vocab_file=vocab).encode("a")


@pytest.mark.parametrize("strategy", ["cpu fp32 *\u0661 -> cpu fp32", "cuda:\u0661 fp16", "cpu\u00a0fp32"])
def test_strategy_counts_and_devices_are_ascii(strategy):
    """Python's int() reads Arabic-Indic digits; a strategy string must not."""
    with pytest.raises(StrategyError, match="cannot parse stage"):
        parse_strategy(strategy, 2)


def test_ctypes_layer_struct_is_checked_against_the_native_one(monkeypatch):
    """The Python mirror of ``struct Layer`` is compared with the library's own layout at load; a
    field added on one side only is an error, not misread weights."""
    lib = cpu.library()
    cpu.check_layout(lib)  # the shipped pair matches

    class Shifted(ctypes.Structure):
        _fields_ = [("extra", ctypes.c_int64), *cpu._Layer._fields_]

    monkeypatch.setattr(cpu, "_Layer", Shifted)
    with pytest.raises(RuntimeError, match="does not match struct Layer"):
        cpu.check_layout(lib)
