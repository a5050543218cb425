"""RWKV-6, RWKV-5.2 and RWKV-4 as architecture plugins: oracle parity (the `rwkv` package's generic
class, ``cpu fp32`` and ``cpu bf16``, in a subprocess) on random World-shaped checkpoints, on
every CPU backend; states, detection, checkpoints; a third-party architecture from an entry point.

fp32 tolerance: FP32_RTOL of test_oracle_parity (2e-5 of the largest reference logit), for the
same reason: both sides run the same fp32 math in another operation order (the WKV-5/6 scan is
the reference's loop, op for op; the token-shift mixes of RWKV-4/5 are ``x + (shifted - x)(1-m)``
instead of ``x m + shifted (1-m)``, one rounding apart). Measured: ~3e-7 on the tiny models.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch

from conftest import API_DEMO, run_oracle
from rwkvkit import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.checkpoint import expected_shapes, load_checkpoint
from rwkvkit.errors import CheckpointError, StateError
from rwkvkit.registry import Registry
from rwkvkit.state import State
from rwkvkit.testing import make_checkpoint, make_spec, random_checkpoint, save_checkpoint
from test_generation import PROMPT, SEED_ARGS
from test_oracle_parity import FP32_RTOL, ours, parity_runs, rel_err

GENERATIONS = ("rwkv6", "rwkv5", "rwkv4")
# name -> (n_layer, n_embd, vocab_size, seed): a tiny model, and the 0.1B World shape
SHAPES = {"tiny": (2, 128, 65536, 1), "base": (12, 768, 65536, 2)}
BACKENDS = ["torch", "cpu"]
GENERATION_CASES = {
    "greedy": dict(temperature=0, alpha_frequency=0, alpha_presence=0),
    "penalties_and_bans": dict(SEED_ARGS, temperature=0, token_ban=[0, 11, 33, 261]),
    "chunked_prefill": dict(SEED_ARGS, temperature=0, chunk_len=5),
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Checkpoint files per (generation, shape), made on first use."""
    root, made = tmp_path_factory.mktemp("generations"), {}

    def get(gen: str, shape: str):
        if (gen, shape) not in made:
            L, C, V, seed = SHAPES[shape]
            made[(gen, shape)] = make_checkpoint(root / f"{gen}-{shape}.pth", L, C, V, seed=seed, architecture=gen)
        return made[(gen, shape)]

    return get


@pytest.fixture(scope="module")
def oracle(paths, tmp_path_factory):
    """The oracle's outputs per (generation, shape, strategy): one subprocess each."""
    cache: dict[tuple[str, str, str], dict] = {}

    def get(gen: str, shape: str, strategy: str) -> dict:
        key = (gen, shape, strategy)
        if key not in cache:
            gens = {name: {"prompt": PROMPT, "token_count": 24, "args": args} for name, args in GENERATION_CASES.items()} if strategy == "cpu fp32" else {}
            cache[key] = run_oracle(paths(gen, shape), strategy, tmp_path_factory.mktemp("oracle"), runs=parity_runs(SHAPES[shape][2]), generations=gens, v7=False)
        return cache[key]

    return get


def assert_matches(got: dict, ref: dict, rtol: float, what: str) -> None:
    assert len(got["logits"]) == len(ref["logits"])
    for i, (a, b) in enumerate(zip(got["logits"], ref["logits"])):
        assert a.shape == b.shape, f"{what} chunk {i}"
        assert rel_err(a, b) < rtol, f"{what} chunk {i}: logits differ by {rel_err(a, b):.2e} of their scale"
    assert len(got["state"]) == len(ref["state"])
    for i, (a, b) in enumerate(zip(got["state"], ref["state"])):
        assert rel_err(a, b) < rtol, f"{what}: state tensor {i} differs by {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("gen", GENERATIONS)
def test_fp32_logits_and_states_match_oracle(paths, oracle, gen, shape, backend):
    """1, 5 and 320 tokens, chunked and whole, 12 decode steps, full_output."""
    m = RWKV(paths(gen, shape), "cpu fp32", backend=backend)
    ref = oracle(gen, shape, "cpu fp32")
    for name, run in parity_runs(SHAPES[shape][2]).items():
        assert_matches(ours(m, run), ref[name], FP32_RTOL, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gen", GENERATIONS)
def test_bf16_no_worse_than_oracle_bf16(paths, oracle, gen, backend):
    """The bound of test_oracle_parity's bf16 test (our error against the fp32 reference at most
    1.5x the oracle's own bf16 error + 2e-3, and under 5% of the logit scale)."""
    m = RWKV(paths(gen, "tiny"), "cpu bf16", backend=backend)
    ref32, ref16 = oracle(gen, "tiny", "cpu fp32"), oracle(gen, "tiny", "cpu bf16")
    for run in ("api_demo", "long_chunked", "decode"):
        got = ours(m, parity_runs(SHAPES["tiny"][2])[run])
        for i, (a, truth, theirs) in enumerate(zip(got["logits"], ref32[run]["logits"], ref16[run]["logits"])):
            ours_err, oracle_err = rel_err(a, truth), rel_err(theirs, truth)
            assert ours_err < 0.05, f"{run} chunk {i}: bf16 error {ours_err:.3f}"
            assert ours_err <= 1.5 * oracle_err + 2e-3, f"{run} chunk {i}: ours {ours_err:.4f} vs oracle {oracle_err:.4f}"


@pytest.mark.parametrize("gen", GENERATIONS)
def test_int8_logits_close_to_oracle_fp32(paths, oracle, gen):
    """``cpu fp32i8`` within the int8 bound of test_int8 (mean logit cosine >= 0.999 against fp32
    over the 320-token run and the decode steps)."""
    m = RWKV(paths(gen, "tiny"), "cpu fp32i8")
    ref = oracle(gen, "tiny", "cpu fp32")
    runs = parity_runs(SHAPES["tiny"][2])
    cos = []
    for name in ("long_chunked", "decode", "api_demo_full"):
        got = ours(m, runs[name])
        cos += [torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1) for a, b in zip(got["logits"], ref[name]["logits"])]
    assert float(torch.cat(cos).mean()) >= 0.999


@pytest.mark.parametrize("backend", [*BACKENDS, "int8"])
@pytest.mark.parametrize("gen", GENERATIONS)
def test_greedy_pipeline_text_matches_oracle(paths, oracle, gen, backend):
    """Greedy PIPELINE.generate, with penalties and bans and chunked prefill: the oracle's tokens
    and text exactly (int8: the same tokens as our own fp32, since rounding may flip a near tie
    against the reference; checked on the fp32 backends)."""
    strategy = "cpu fp32i8" if backend == "int8" else "cpu fp32"
    m = RWKV(paths(gen, "tiny"), strategy, backend="auto" if backend == "int8" else backend)
    ref = oracle(gen, "tiny", "cpu fp32")
    for name, args in GENERATION_CASES.items():
        result = PIPELINE(m, "rwkv_vocab_v20230424").generate(PROMPT, 24, PIPELINE_ARGS(**args), return_result=True)
        if backend != "int8":
            assert result.tokens == ref[name]["sampled"] and result.text == ref[name]["text"], name
        else:
            assert len(result.tokens) == 24


@pytest.mark.parametrize("gen", GENERATIONS)
def test_chunked_batched_and_saved_states(paths, gen, tmp_path):
    """Chunked equals whole; a batch row equals the sequence alone; save/load keeps the state and
    another model's (or another generation's) state is refused."""
    m = RWKV(paths(gen, "tiny"), "cpu fp32")
    out, state = m.forward(API_DEMO, None)
    _, s = m.forward(API_DEMO[:2], None)
    out2, s = m.forward(API_DEMO[2:], s)
    assert rel_err(out2, out) < FP32_RTOL
    batch_out, batch_state = m.forward(torch.tensor([API_DEMO, API_DEMO[::-1]]), None)
    assert rel_err(batch_out[0], out) < FP32_RTOL
    state.save(tmp_path / "s.safetensors")
    loaded = State.load(tmp_path / "s.safetensors", m)
    for a, b in zip(loaded.layers, state.layers):
        assert a.names() == b.names() and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert torch.equal(m.forward([1], loaded)[0], m.forward([1], state)[0])
    other = RWKV(paths("rwkv6" if gen == "rwkv4" else "rwkv4", "tiny"), "cpu fp32")  # another state layout
    with pytest.raises(StateError, match="another model"):
        State.load(tmp_path / "s.safetensors", other)
    foreign = other.zero_state()
    foreign.fingerprint = m.fingerprint  # even with this model's tag, the layout gives it away
    with pytest.raises(StateError, match="another architecture"):
        m.forward([1], foreign)


def test_rwkv4_state_starts_with_no_past(paths):
    m = RWKV(paths("rwkv4", "tiny"), "cpu fp32")
    layer = m.zero_state().layers[0]
    assert layer.names() == ("att_xx", "aa", "bb", "pp", "ffn_xx")
    assert torch.equal(layer.pp, torch.full_like(layer.pp, -1e30)) and layer.aa.dtype == torch.float32


@pytest.mark.parametrize("gen", GENERATIONS)
def test_random_checkpoint_has_real_keys_and_every_tensor_matters(gen, tmp_path):
    """Keys and shapes of a real World file; zeroing any one tensor changes the logits."""
    spec = make_spec(1, 128, 512, architecture=gen)  # one layer has every kind of key
    tensors = random_checkpoint(spec, seed=3)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected_shapes(spec)
    tokens = [187, 510, 15, 310, 247]
    base = RWKV(save_checkpoint(tensors, tmp_path / "base.pth"), "cpu fp32", backend="torch").forward(tokens, None)[0]
    for key in sorted(tensors):
        edited = dict(tensors, **{key: torch.zeros_like(tensors[key])})
        out = RWKV(save_checkpoint(edited, tmp_path / "edited.pth"), "cpu fp32", backend="torch").forward(tokens, None)[0]
        assert not torch.allclose(out, base, rtol=1e-4, atol=1e-4), f"zeroing {key} left the logits unchanged"


@pytest.mark.parametrize("gen", GENERATIONS)
def test_bf16_stays_finite_over_1000_tokens(paths, gen):
    m = RWKV(paths(gen, "tiny"), "cpu bf16")
    seq = torch.randint(0, 65536, (1000,), generator=torch.Generator().manual_seed(5)).tolist()
    logits, state = m.forward(seq, None, full_output=True)
    assert torch.isfinite(logits).all() and all(torch.isfinite(t).all() for layer in state.layers for t in layer.tensors())


@pytest.mark.parametrize("gen", GENERATIONS)
def test_fp16_with_rescaling_stays_finite_and_close(gen, tmp_path):
    """fp16 (the torch backend on the CPU) over 1,000 tokens of a 14-layer model: the residual
    stream is halved after layers 6 and 12 (RESCALE_LAYER) and the logits stay finite and within
    fp16's error of fp32 (5% of the logit scale: fp16 rounds at 2^-11 per op over 14 layers)."""
    path = make_checkpoint(tmp_path / "deep.pth", 14, 64, 512, seed=4, architecture=gen)
    seq = torch.randint(0, 512, (1000,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = RWKV(path, "cpu fp32").forward(seq, None)[0]
    half = RWKV(path, "cpu fp16", backend="torch")
    assert [b.halve_after for b in half.stages[0].blocks].count(True) == 2
    out = half.forward(seq, None)[0]
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.05


@pytest.mark.parametrize(
    "gen, edit, message",
    [
        ("rwkv6", lambda t: t.pop("blocks.1.att.time_maa_g"), "RWKV-6 (Finch) 'x060' checkpoint: missing key 'blocks.1.att.time_maa_g'"),
        ("rwkv5", lambda t: t.__setitem__("blocks.0.att.time_decay", torch.zeros(2)), "RWKV-5.0/5.1 file"),
        ("rwkv4", lambda t: t.__setitem__("blocks.0.att.time_first", torch.zeros(3)), "RWKV-4 'v4' checkpoint: key 'blocks.0.att.time_first' has shape [3]; expected [128]"),
        ("rwkv6", lambda t: t.__setitem__("blocks.0.att.time_state", torch.zeros(2, 64, 64)), "no state for layer 1 ('blocks.1.att.time_state')"),  # a merged state: every layer's
        ("rwkv4", lambda t: t.__setitem__("blocks.0.att.time_state", torch.zeros(2, 64, 64)), "this model is rwkv4: RWKV-4 has no WKV matrix state"),
    ],
)
def test_bad_checkpoints_name_the_generation_and_key(gen, edit, message, tmp_path):
    tensors = random_checkpoint(make_spec(2, 128, 512, architecture=gen))
    edit(tensors)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(save_checkpoint(tensors, tmp_path / "bad.pth"))
    assert message in str(info.value)


@pytest.mark.parametrize("gen", ("rwkv7", *GENERATIONS))
def test_info_names_the_generation(gen, tmp_path, capsys):
    from rwkvkit.cli import main

    path = make_checkpoint(tmp_path / "m.pth", 2, 128, 512, architecture=gen)
    assert main(["info", str(path)]) in (0, None)
    first = " ".join(capsys.readouterr().out.splitlines()[:2])
    assert {"rwkv7": "RWKV-7 (Goose) 'x070'", "rwkv6": "RWKV-6 (Finch) 'x060'", "rwkv5": "RWKV-5.2 (Eagle) 'x052'", "rwkv4": "RWKV-4 'v4'"}[gen] in first


TOY = '''
"""A deliberately tiny third-party architecture: embedding, one token-shift mix per layer, head."""
from dataclasses import dataclass
import torch
from rwkvkit.architecture import Architecture, check_tensors, n_layers, shape2d
from rwkvkit.backend import Role
from rwkvkit.checkpoint import WeightSource
from rwkvkit.hookspecs import hookimpl
from rwkvkit.state import LayerTensors, StateField, StateLayout
from rwkvkit.weights import load_weights, weight


@dataclass(frozen=True)
class ToySpec:
    architecture = "toy-shift"
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_ffn: int = 0
    version: str = "toy"


@dataclass
class ToyState(LayerTensors):
    x_prev: torch.Tensor


@dataclass
class ToyBlock:
    mix: torch.Tensor = weight("shift.mix", Role.VECTOR)


@dataclass
class ToyHead:
    head: object = weight("head.weight", Role.MATRIX)


class ToyShift(Architecture):
    name = "toy-shift"
    version = "toy"
    title = "Toy shift"

    def claims(self, keys):
        return "blocks.0.shift.mix" in keys

    def spec(self, t):
        V, C = shape2d(t, "emb.weight", "vocab_size, n_embd")
        spec = ToySpec(n_layers(t), C, V)
        check_tensors(t, self.expected_shapes(spec), (), "not a toy")
        return spec

    def expected_shapes(self, spec):
        shapes = {"emb.weight": (spec.vocab_size, spec.n_embd), "head.weight": (spec.vocab_size, spec.n_embd)}
        shapes.update({f"blocks.{i}.shift.mix": (spec.n_embd,) for i in range(spec.n_layer)})
        return shapes

    def state_layout(self, spec):
        return StateLayout(ToyState, (StateField("x_prev", (spec.n_embd,)),))

    def embedding(self, t):
        return WeightSource("emb.weight", t["emb.weight"])

    def load_block(self, spec, layer, fetch):
        return load_weights(ToyBlock, f"blocks.{layer}.", fetch)

    def load_head(self, spec, fetch):
        return load_weights(ToyHead, "", fetch)

    def block(self, ops, w, x, carry, s):
        shifted = torch.cat((s.x_prev.unsqueeze(1), x[:, :-1]), dim=1)
        return x + torch.tanh(shifted * w.mix), carry, ToyState(x[:, -1])

    def head(self, ops, w, x):
        return ops.linear(x, w.head)


@hookimpl
def register_architectures(register):
    register(ToyShift)
'''


def test_third_party_architecture_from_an_entry_point(tmp_path, monkeypatch):
    """A package's architecture, found through the ``rwkvkit`` entry-point group, loads a
    checkpoint it claims and runs end to end: forward, states, save/load, PIPELINE."""
    (tmp_path / "toy_shift_arch.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="toy-shift", value="toy_shift_arch", group="rwkvkit")
    monkeypatch.setattr("rwkvkit.registry.entry_points", lambda group: [ep] if group == "rwkvkit" else [])
    fresh = Registry()
    monkeypatch.setattr("rwkvkit.registry.registry", fresh)
    assert "toy-shift" in fresh.names("architectures")
    g = torch.Generator().manual_seed(0)
    tensors = {"emb.weight": torch.randn(65536, 16, generator=g), "head.weight": torch.randn(65536, 16, generator=g)}
    tensors.update({f"blocks.{i}.shift.mix": torch.randn(16, generator=g) for i in range(3)})
    path = save_checkpoint(tensors, tmp_path / "toy.pth")
    m = RWKV(path, "cpu fp32")
    assert type(m.architecture).__name__ == "ToyShift" and m.version == "toy"
    out, state = m.forward(API_DEMO, None)
    _, s = m.forward(API_DEMO[:3], None)
    out2, s = m.forward(API_DEMO[3:], s)
    assert torch.allclose(out, out2, atol=1e-5) and state.layers[0].names() == ("x_prev",)
    state.save(tmp_path / "toy.safetensors")
    assert torch.equal(State.load(tmp_path / "toy.safetensors", m).layers[2].x_prev, state.layers[2].x_prev)
    text = PIPELINE(m, "rwkv_vocab_v20230424").generate("Hi", 8, PIPELINE_ARGS(temperature=0))
    assert isinstance(text, str)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_engine_batch_equals_each_prompt_alone(paths, gen):
    """The batching engine (mixed prompt lengths, a prefill budget) on each generation's layout."""
    from rwkvkit.engine import Engine
    from rwkvkit.resolve import resolve_tokenizer
    from test_engine import alone, assert_same, prompts, request

    model, tok = RWKV(paths(gen, "tiny"), "cpu fp32"), resolve_tokenizer("rwkv_vocab_v20230424")
    reqs = [request(ids, "greedy", i) for i, ids in enumerate(prompts(model, (1, 150, 9)))]
    for req, got in zip(reqs, Engine(model, tok, max_batch=4, prefill_tokens_per_step=64).generate(reqs)):
        assert_same(got, alone(model, tok, req, chunk_len=64))


@pytest.mark.parametrize("strategy", ["cpu fp32 *1 -> cpu fp32", "cpu fp32 *1 -> cpu bf16"])
@pytest.mark.parametrize("gen", GENERATIONS)
def test_layer_splitting(paths, gen, strategy):
    """Stages give the single-stage logits (fp32 up to the GEMM order; a bf16 second stage within
    the bf16 test's 5% bound). Streaming (``*N+``) runs on a GPU: test_cuda_matches_oracle_fp32."""
    seq = torch.randint(0, 65536, (40,), generator=torch.Generator().manual_seed(8)).tolist()
    ref = RWKV(paths(gen, "tiny"), "cpu fp32").forward(seq, None)[0]
    out = RWKV(paths(gen, "tiny"), strategy).forward(seq, None)[0]
    assert rel_err(out, ref) < (0.05 if "bf16" in strategy else FP32_RTOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine; GPU paths are exercised on a lent GPU machine")
@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("strategy, rtol", [("cuda fp32", FP32_RTOL), ("cuda fp16", 1e-2), ("cuda bf16", 5e-2), ("cuda fp16i8", 5e-2), ("cuda fp16 *1+", 1e-2)])
@pytest.mark.parametrize("gen", GENERATIONS)
def test_cuda_matches_oracle_fp32(paths, oracle, gen, strategy, rtol, backend):
    """The GPU paths (the generic ``torch`` ops and the ``cuda`` backend's, whose fused RWKV-7
    kernels these generations do not use) against the oracle's ``cpu fp32``; the bounds of
    tests/test_gpu.py (fp16 at 2^-11 per op, bf16 at 2^-9; fp16 with RESCALE_LAYER)."""
    if backend == "torch" and strategy.endswith("i8"):
        pytest.skip("int8 runs on the cuda backend")
    m = RWKV(paths(gen, "tiny"), strategy, backend=backend)
    ref = oracle(gen, "tiny", "cpu fp32")
    for name in ("long_chunked", "decode", "api_demo_full"):
        got = ours(m, parity_runs(SHAPES["tiny"][2])[name])
        for i, (a, b) in enumerate(zip(got["logits"], ref[name]["logits"])):
            assert rel_err(a.cpu(), b) < rtol, f"{name} chunk {i}: {rel_err(a.cpu(), b):.2e}"


def test_pile_rwkv4_with_an_hf_tokenizer_matches_oracle(tmp_path):
    """RWKV-4 Pile models use the HF ``20B_tokenizer.json`` (shipped in ChatRWKV's repository);
    any ``tokenizer.json`` works the same way: here the demo model's 4,096-token one, greedy with
    penalties, against the oracle's PIPELINE given the same file."""
    from rwkvkit.paths import resolve_file

    tokenizer = str(resolve_file("pkg://rwkvkit.demo/tokenizer.json"))
    path = make_checkpoint(tmp_path / "pile.pth", 2, 128, 4096, seed=9, architecture="rwkv4")
    args = GENERATION_CASES["penalties_and_bans"]
    ref = run_oracle(path, "cpu fp32", tmp_path, generations={"g": {"prompt": PROMPT, "token_count": 24, "args": args}}, v7=False, tokenizer=tokenizer)["g"]
    result = PIPELINE(RWKV(path, "cpu fp32"), tokenizer).generate(PROMPT, 24, PIPELINE_ARGS(**args), return_result=True)
    # ChatRWKV's PIPELINE stops emitting text at a token the HF tokenizer decodes to U+FFFD (a
    # byte token alone) and never resumes; rwkvkit emits the rest: the tokens are the check here
    assert result.tokens == ref["sampled"] and result.text.startswith(ref["text"])
