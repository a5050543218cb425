"""Property test run by tests/test_bad_inputs.py in a subprocess (a crash in native code must fail
that test, not kill pytest): random state tensors (shapes, dtypes, values) and random token inputs
into ``forward`` of the ``cpu`` backend give either the torch backend's result or an RwkvkitError.

Usage: python fuzz_forward.py CHECKPOINT MAX_EXAMPLES
"""

from __future__ import annotations

import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvkit import RWKV, RwkvkitError
from rwkvkit.state import LayerState, State

path, max_examples = sys.argv[1], int(sys.argv[2])
model = RWKV(path, "cpu fp32", backend="cpu")
reference = RWKV(path, "cpu fp32", backend="torch")
spec = model.spec
C, H, N, V = spec.n_embd, spec.n_head, spec.head_size, spec.vocab_size
FIELDS = ("att_x_prev", "att_kv", "ffn_x_prev")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64)


@st.composite
def tensors(draw, right_shape: tuple[int, ...]) -> torch.Tensor:
    """Mostly the right shape (so later layers are reached), else a random one."""
    if draw(st.booleans()):
        shape = right_shape
    else:
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, H, N, C, 2 * C]), min_size=0, max_size=5)))
    dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 3)) == 0 else torch.float32
    fill = draw(st.sampled_from(["randn", "randn", "zeros", "nan", "inf"]))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) * 0.3
    if fill != "randn" and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = {"zeros": 0.0, "nan": float("nan"), "inf": float("inf")}[fill]
    t = t.to(dtype) if dtype.is_complex or dtype.is_floating_point else (t * 3).to(dtype)
    if draw(st.integers(0, 5)) == 0 and t.dim() >= 2:
        t = t.transpose(0, -1)  # non-contiguous (and usually the wrong shape)
    return t


@st.composite
def states(draw) -> State | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    batch = draw(st.sampled_from([1, 1, 2]))
    layers = []
    for _ in range(draw(st.sampled_from([spec.n_layer] * 4 + [0, 1, spec.n_layer + 1]))):
        shapes = ((batch, C), (batch, H, N, N), (batch, C))
        layers.append(LayerState(*(draw(tensors(s)) for s in shapes)))
    return State(layers, model.fingerprint)


token_inputs = st.one_of(
    st.integers(-3, V + 3),
    st.lists(st.integers(-3, V + 3), min_size=0, max_size=4),
    st.lists(st.one_of(st.integers(0, V - 1), st.booleans(), st.floats(0, 5), st.integers(2**62, 2**70)), min_size=1, max_size=3),
    st.builds(lambda b, t, hi: torch.randint(0, hi, (b, t)), st.integers(1, 2), st.integers(0, 3), st.sampled_from([V, V + 5])),
)


@settings(max_examples=max_examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(tokens=token_inputs, state=states())
def check(tokens, state) -> None:
    try:
        out, new_state = model.forward(tokens, state)
    except RwkvkitError:
        return
    ref_out, ref_state = reference.forward(tokens, state)  # accepted by one backend: so by the other
    # fp32 both ways, only the summation order differs (the oracle tolerance); finite inputs stay finite
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5 * float(ref_out.abs().max()))
    assert torch.isfinite(out).all()
    assert new_state.batch_size == ref_state.batch_size


check()
print("fuzz ok")
