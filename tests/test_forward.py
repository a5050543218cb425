"""``Model.forward`` input forms, outputs, batching, purity, and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import API_DEMO
from rwkvkit import RWKV, InputError, StateError


@pytest.fixture(scope="module")
def model(model_paths) -> RWKV:
    return RWKV(model_paths["tiny"], "cpu fp32")


@pytest.mark.parametrize(
    "tokens",
    [[187], 187, np.int64(187), torch.tensor(187), torch.tensor([187]), np.array([187]), (187,)],
    ids=["list", "int", "numpy-int", "tensor-0d", "tensor-1d", "numpy-1d", "tuple"],
)
def test_input_forms_agree(model, tokens):
    ref, _ = model.forward([187], None)
    out, state = model.forward(tokens, None)
    assert out.shape == (model.spec.vocab_size,)
    assert torch.equal(out, ref)
    assert state.batch_size == 1


def test_full_output_rows_are_per_position_logits(model):
    full, _ = model.forward(API_DEMO, None, full_output=True)
    assert full.shape == (len(API_DEMO), model.spec.vocab_size)
    for t in range(len(API_DEMO)):
        prefix, _ = model.forward(API_DEMO[: t + 1], None)
        torch.testing.assert_close(full[t], prefix, rtol=0, atol=2e-5 * float(prefix.abs().max()))


def test_batch_rows_equal_single_runs(model):
    batch = torch.tensor([API_DEMO, API_DEMO[::-1]])
    out, state = model.forward(batch, None)
    assert out.shape == (2, model.spec.vocab_size) and state.batch_size == 2
    for row in range(2):
        single, s = model.forward(batch[row].tolist(), None)
        torch.testing.assert_close(out[row], single, rtol=0, atol=2e-5 * float(single.abs().max()))
        torch.testing.assert_close(state[row].layers[1].att_kv, s.layers[1].att_kv)
    more, _ = model.forward(torch.tensor([[5], [6]]), state)
    assert more.shape == (2, model.spec.vocab_size)


def test_forward_does_not_mutate_the_given_state(model):
    _, state = model.forward(API_DEMO, None)
    before = copy.deepcopy(state)
    a, _ = model.forward([11, 12], state)
    b, _ = model.forward([11, 12], state)  # the same state again gives the same result
    assert torch.equal(a, b)
    for x, y in zip(state.layers, before.layers):
        assert all(torch.equal(p, q) for p, q in zip(x.tensors(), y.tensors()))


def test_chatrwkv_deepcopy_idiom(model):
    _, state = model.forward(API_DEMO, None)
    saved = copy.deepcopy(state)
    out1, _ = model.forward([42], state)
    out2, _ = model.forward([42], saved)
    assert torch.equal(out1, out2)
    assert saved.fingerprint == model.fingerprint


def test_compat_attributes(model):
    assert model.args.n_layer == 2 and model.args.n_embd == 128 and model.args.vocab_size == 2048
    assert model.version == 7
    assert model.generate_zero_state().layers[0].att_kv.shape == (1, 2, 64, 64)


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([], "empty"),
        (torch.tensor([], dtype=torch.long), "empty"),
        ([2048], "token id 2048 is out of range"),
        ([-1], "token id -1 is out of range"),
        (torch.tensor([[1, 2049]]), "token id 2049 is out of range"),
        ([1.5], "sequence of ints"),
        ("hello", "got str"),
        (None, "got NoneType"),
        (True, "got bool"),
        (torch.tensor([1.0]), "dtype torch.float32"),
        (torch.zeros(1, 1, 1, dtype=torch.long), "shape [1, 1, 1]"),
    ],
)
def test_bad_tokens_give_clear_errors(model, tokens, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model.forward(tokens, None)


def test_state_batch_size_mismatch(model):
    _, state = model.forward(API_DEMO, None)
    with pytest.raises(InputError, match="state has batch size 1 but tokens have batch size 2"):
        model.forward(torch.tensor([[1], [2]]), state)


def test_state_from_another_model_is_refused(model, model_paths):
    other = RWKV(model_paths["world"], "cpu fp32")
    _, state = other.forward([1], None)
    with pytest.raises(StateError, match="another model"):
        model.forward([1], state)
