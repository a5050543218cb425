"""Model files besides BlinkDL's .pth (issue 19, RWKV-7): Hugging Face folders in fla-hub's layout,
state-tuned initial states, LoRA adapters merged at load, ``rwkvkit convert`` and ``info``.

Every file a reader is tested on is built here by an independent path: the fla layout's key
mapping is written out below from fla's ``convert_from_rwkv7.py`` (not taken from rwkvkit), the
tuned state and LoRA files are made with RWKV-PEFT's key names, and LoRA is merged by hand with
RWKV-PEFT's ``merge_lora.py`` formula.

Tolerance: a format reader hands the model the very same fp32 numbers, so logits agree exactly;
the issue's bound (max relative difference <= 1e-6) is asserted, and any mapping error (a missed
transpose, a swapped key) moves them by far more.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_oracle
from rwkvkit import RWKV
from rwkvkit.checkpoint import load_checkpoint
from rwkvkit.cli import main
from rwkvkit.compat import PIPELINE, PIPELINE_ARGS
from rwkvkit.errors import CheckpointError, InputError, StateError, TokenizerError
from rwkvkit.formats import hf
from rwkvkit.formats.convert import ConvertError, convert
from rwkvkit.generation import generate
from rwkvkit.plugins.samplers import GreedySampler
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.state import LayerState, State
from rwkvkit.testing import make_spec, random_checkpoint, save_checkpoint

SPEC = make_spec(n_layer=3, n_embd=128, vocab_size=4096)  # the demo tokenizer's vocabulary size
TOKENS = [187, 510, 1563, 310, 247, 3000, 7]
UNUSED = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # layer 0's value residual, never read


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("formats")
    tensors = random_checkpoint(SPEC, seed=5)
    return save_checkpoint(tensors, root / "source.pth"), tensors


@pytest.fixture(scope="module")
def reference(source) -> torch.Tensor:
    return RWKV(source[0], "cpu fp32").forward(TOKENS, None)[0]


# ---- Hugging Face folders, built from fla's documented layout


def fla_tensors(blink: dict[str, torch.Tensor], stacked_mixes: bool = False) -> dict[str, torch.Tensor]:
    """BlinkDL -> fla names as fla's utils/convert_from_rwkv7.py does: LoRA factors transposed into
    ``{w,a,v,g}_lora.lora.{0,2}.weight`` with ``w0/a0/v0`` as ``lora.2.bias`` [C]; k_k, k_a, ffn.x_k
    flattened to [C]; x_* kept [1, 1, C] (or, as older fla saved them, stacked in ``attn.x_x``)."""
    out = {
        "model.embeddings.weight": blink["emb.weight"],
        "model.norm.weight": blink["ln_out.weight"],
        "model.norm.bias": blink["ln_out.bias"],
        "lm_head.weight": blink["head.weight"],
        "model.layers.0.pre_norm.weight": blink["blocks.0.ln0.weight"],
        "model.layers.0.pre_norm.bias": blink["blocks.0.ln0.bias"],
    }
    for i in range(SPEC.n_layer):
        b, f = f"blocks.{i}.", f"model.layers.{i}."
        for part in ("weight", "bias"):
            out[f"{f}attn_norm.{part}"] = blink[f"{b}ln1.{part}"]
            out[f"{f}ffn_norm.{part}"] = blink[f"{b}ln2.{part}"]
            out[f"{f}attn.g_norm.{part}"] = blink[f"{b}att.ln_x.{part}"]
        mixes = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"]
        if stacked_mixes:
            out[f"{f}attn.x_x"] = torch.stack([blink[f"{b}att.{m}"].flatten() for m in mixes])
        else:
            out.update({f"{f}attn.{m}": blink[f"{b}att.{m}"] for m in mixes})
        for name in ("k_k", "k_a"):
            out[f"{f}attn.{name}"] = blink[f"{b}att.{name}"].flatten()
        out[f"{f}attn.r_k"] = blink[f"{b}att.r_k"]
        for ours, theirs in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
            out[f"{f}attn.{theirs}.weight"] = blink[f"{b}att.{ours}.weight"]
        for lora in ("w", "a", "v", "g"):
            if lora == "v" and i == 0:
                continue
            out[f"{f}attn.{lora}_lora.lora.0.weight"] = blink[f"{b}att.{lora}1"].t().contiguous()
            out[f"{f}attn.{lora}_lora.lora.2.weight"] = blink[f"{b}att.{lora}2"].t().contiguous()
            if lora != "g":
                out[f"{f}attn.{lora}_lora.lora.2.bias"] = blink[f"{b}att.{lora}0"].flatten()
        out[f"{f}ffn.x_k"] = blink[f"{b}ffn.x_k"].flatten()
        out[f"{f}ffn.key.weight"] = blink[f"{b}ffn.key.weight"]
        out[f"{f}ffn.value.weight"] = blink[f"{b}ffn.value.weight"]
    return out


FLA_CONFIG = {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "hidden_size": 128, "num_hidden_layers": 3, "head_dim": 64, "vocab_size": 4096, "norm_eps": 1e-5}


def make_folder(root: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None) -> Path:
    """An HF folder the way save_pretrained writes one: model.safetensors, or shards + index."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config or FLA_CONFIG))
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
        return root
    keys = list(tensors)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {key: names[j * shards // len(keys)] for j, key in enumerate(keys)}
    for name in names:
        save_file({k: tensors[k] for k in keys if weight_map[k] == name}, str(root / name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.mark.parametrize("shards, stacked", [(1, False), (3, False), (1, True)], ids=["single", "sharded", "old-x_x"])
def test_hf_folder_gives_the_source_logits(source, reference, tmp_path, shards, stacked):
    folder = make_folder(tmp_path / "hf", fla_tensors(source[1], stacked), shards)
    model = RWKV(folder, "cpu fp32")
    assert rel_diff(model.forward(TOKENS, None)[0], reference) <= 1e-6
    assert model.fingerprint == RWKV(source[0], "cpu fp32").fingerprint  # the same model, whatever the file


def test_hf_folder_tokenizer_and_info(source, tmp_path, capsys):
    folder = make_folder(tmp_path / "hf", fla_tensors(source[1]))
    world = resources.files("rwkvkit.plugins").joinpath("rwkv_vocab_v20230424.txt")
    shutil.copyfile(str(world), folder / "rwkv_vocab_v20230424.txt")
    text = "Hello, world! 你好"
    assert resolve_tokenizer(folder).encode(text) == resolve_tokenizer("rwkv_vocab_v20230424").encode(text)
    shutil.copyfile(str(resources.files("rwkvkit.demo").joinpath("tokenizer.json")), folder / "tokenizer.json")  # preferred
    assert resolve_tokenizer(folder).encode(text) == resolve_tokenizer("pkg://rwkvkit.demo/tokenizer.json").encode(text)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face folder, model_type rwkv7, 1 safetensors file, tokenizer tokenizer.json" in out and "n_layer    3" in out


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


DAMAGED = {
    "foreign model_type": (lambda t: t, {**FLA_CONFIG, "model_type": "llama"}, "model_type 'llama' is not an RWKV layout"),
    "config contradicts weights": (lambda t: t, {**FLA_CONFIG, "num_hidden_layers": 4}, "num_hidden_layers=4 but the weights have 3"),
    "other norm eps": (lambda t: t, {**FLA_CONFIG, "norm_eps": 1e-6}, "norm_eps=1e-06"),
    "unknown key": (lambda t: {**t, "model.layers.0.attn.q_proj.weight": torch.zeros(2, 2)}, None, "unexpected key 'model.layers.0.attn.q_proj.weight'"),
    "missing key": (lambda t: _drop(t, "model.layers.1.attn.k_proj.weight"), None, "missing key 'blocks.1.att.key.weight'"),
    "transposed LoRA": (lambda t: {**t, "model.layers.1.attn.w_lora.lora.0.weight": t["model.layers.1.attn.w_lora.lora.0.weight"].t().contiguous()}, None, "blocks.1.att.w1"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_or_foreign_folder_is_refused_clearly(source, tmp_path, case):
    edit, config, message = DAMAGED[case]
    folder = make_folder(tmp_path / "hf", edit(fla_tensors(source[1])), config=config)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(folder)
    assert str(folder) in str(err.value)


def test_a_damaged_sharded_folder_is_refused_clearly(source, tmp_path):
    folder = make_folder(tmp_path / "hf", fla_tensors(source[1]), shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.attn.extra"] = "model-00001-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00003.safetensors: tensor 'model.layers.0.attn.extra' is listed for it in model.safetensors.index.json but not in it"):
        load_checkpoint(folder)
    moved = {k: v for k, v in index["weight_map"].items() if k != "model.layers.0.attn.extra"}
    key = next(k for k, v in moved.items() if v == "model-00002-of-00003.safetensors")
    moved[key] = "model-00003-of-00003.safetensors"  # listed in the wrong shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(CheckpointError, match=f"model-00002-of-00003.safetensors: tensor '{key}' is in it but not listed for it"):
        load_checkpoint(folder)
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: not a readable safetensors file"):
        load_checkpoint(folder)
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00003.safetensors is missing"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not a readable JSON file"):
        load_checkpoint(folder)


def test_int8_cache_sees_a_shard_rewritten_in_place(source, tmp_path):
    """A shard overwritten in place leaves the folder's own time as it was: the int8 cache must
    still tell (only the head changes here, so the fingerprint of small tensors is the same)."""
    import os

    from safetensors.torch import save

    folder = make_folder(tmp_path / "hf", fla_tensors(source[1]))
    before = RWKV(folder, "cpu fp32i8").forward(TOKENS, None)[0]
    changed = fla_tensors({**source[1], "head.weight": source[1]["head.weight"] * 2})
    stat = folder.stat()
    with open(folder / "model.safetensors", "r+b") as f:  # same keys and shapes: same size
        f.write(save(changed))
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = RWKV(folder, "cpu fp32i8").forward(TOKENS, None)[0]
    assert torch.equal(after, RWKV(make_folder(tmp_path / "fresh", changed), "cpu fp32i8").forward(TOKENS, None)[0])
    assert not torch.equal(after, before)


def test_a_folder_without_config_is_still_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory without config.json"):
        load_checkpoint(tmp_path)


# ---- state-tuned initial states (RWKV-PEFT: blocks.N.att.time_state [H, N, N], value index first)


def time_states(seed: int = 0, n_layer: int = SPEC.n_layer) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    H, N = SPEC.n_head, SPEC.head_size
    return {f"blocks.{i}.att.time_state": torch.randn(H, N, N, generator=gen) * 0.5 for i in range(n_layer)}


def test_tuned_state_at_start_equals_feeding_it_by_hand(source, reference, tmp_path):
    model = RWKV(source[0], "cpu fp32")
    states = time_states()
    torch.save(states, tmp_path / "tuned.pth")
    tuned = State.from_tuned(tmp_path / "tuned.pth", model)
    C = SPEC.n_embd
    by_hand = State([LayerState(torch.zeros(1, C), states[f"blocks.{i}.att.time_state"][None], torch.zeros(1, C)) for i in range(SPEC.n_layer)], model.fingerprint)
    got = model.forward(TOKENS, tuned)[0]
    assert torch.equal(got, model.forward(TOKENS, by_hand)[0])
    assert rel_diff(got, reference) > 1e-3  # the state matters: this test can tell
    args = PIPELINE_ARGS(temperature=0, token_stop=[])
    pipeline = PIPELINE(model, "pkg://rwkvkit.demo/tokenizer.json")
    assert pipeline.generate("Once", 8, args, state=tuned) == pipeline.generate("Once", 8, args, state=by_hand)


def test_tuned_state_layout_is_the_one_rwkv_runner_feeds_the_reference(source, tmp_path):
    """RWKV-Runner gives an RWKV-7 ``time_state`` to the rwkv package untransposed: the oracle
    started that way must agree with ours (fp32 tolerance of test_oracle_parity), and the
    transposed reading must not."""
    states = time_states(seed=1)
    torch.save(states, tmp_path / "tuned.pth")
    C = SPEC.n_embd
    start = [t for i in range(SPEC.n_layer) for t in (torch.zeros(C), states[f"blocks.{i}.att.time_state"], torch.zeros(C))]
    ref = run_oracle(source[0], "cpu fp32", tmp_path, runs={"tuned": {"chunks": [TOKENS], "full_output": False, "state": start}})["tuned"]["logits"][0]
    model = RWKV(source[0], "cpu fp32")
    assert rel_diff(model.forward(TOKENS, State.from_tuned(tmp_path / "tuned.pth", model))[0], ref) < 2e-5
    torch.save({k: v.transpose(1, 2).contiguous() for k, v in states.items()}, tmp_path / "transposed.pth")
    assert rel_diff(model.forward(TOKENS, State.from_tuned(tmp_path / "transposed.pth", model))[0], ref) > 1e-3


def test_wrong_tuned_state_files_are_refused_naming_layer_and_shape(source, tmp_path):
    model = RWKV(source[0], "cpu fp32")
    cases = {
        "wrong_shape": ({**time_states(), "blocks.1.att.time_state": torch.zeros(4, 32, 32)}, r"layer 1 state has shape \[4, 32, 32\].*needs a floating-point \[2, 64, 64\]"),
        "fewer_layers": (time_states(n_layer=2), r"no state for layer 2 .*the model has 3 layers"),
        "more_layers": (time_states(n_layer=5), r"holds 'blocks.3.att.time_state' but the model has only 3 layers"),
        "not_a_state": ({"emb.weight": torch.zeros(2, 2)}, "no 'blocks.N.att.time_state' tensors"),
        "non_finite": ({**time_states(), "blocks.0.att.time_state": torch.full((2, 64, 64), float("nan"))}, "layer 0 att_kv holds non-finite"),
    }
    for name, (data, message) in cases.items():
        save_file(data, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(StateError, match=message):
            State.from_tuned(tmp_path / f"{name}.safetensors", model)
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle")
    with pytest.raises(StateError, match="not a readable .pth/.safetensors state file"):
        State.from_tuned(tmp_path / "garbage.pth", model)


# ---- LoRA (RWKV-PEFT: <name>.lora_A [r, in], <name>.lora_B [out, r]; W += B @ A * alpha / r)

ALPHA, RANK = 16.0, 8


def adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    C, F = SPEC.n_embd, SPEC.dim_ffn
    out = {}
    for name, (rows, cols) in {"blocks.0.att.receptance": (C, C), "blocks.1.att.value": (C, C), "blocks.2.ffn.key": (F, C), "head": (SPEC.vocab_size, C)}.items():
        out[f"{name}.lora_A"] = torch.randn(RANK, cols, generator=gen) / cols**0.5
        out[f"{name}.lora_B"] = torch.randn(rows, RANK, generator=gen) * 0.05
    out["blocks.1.ln1.weight"] = 1 + torch.randn(C, generator=gen) * 0.1  # trained in full alongside
    return out


def merged_by_hand(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    w = dict(base)
    for k, v in lora.items():  # RWKV-PEFT merge/merge_lora.py: full parameters replace, pairs merge
        if not k.endswith((".lora_A", ".lora_B")):
            w[k] = v
    for k in [k for k in lora if k.endswith(".lora_A")]:
        name = k.removesuffix(".lora_A")
        a, b = lora[k], lora[name + ".lora_B"]
        w[name + ".weight"] = w[name + ".weight"] + b @ a * (alpha / b.shape[1])
    return w


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8"])
def test_lora_merged_at_load_equals_merged_by_hand(source, reference, tmp_path, strategy):
    path, base = source
    torch.save(adapter(), tmp_path / "lora.pth")
    hand = save_checkpoint(merged_by_hand(base, adapter(), ALPHA), tmp_path / "hand.pth")
    plain = RWKV(path, strategy)  # first, so an int8 cache entry of the unmerged weights exists
    merged = RWKV(path, strategy, lora=[{"path": tmp_path / "lora.pth", "alpha": ALPHA}])
    expected = RWKV(hand, strategy).forward(TOKENS, None)[0]
    got = merged.forward(TOKENS, None)[0]
    assert torch.equal(got, expected)
    assert rel_diff(got, plain.forward(TOKENS, None)[0]) > 1e-3 and merged.fingerprint != plain.fingerprint
    # two adapters in order, as tuples
    torch.save(adapter(1), tmp_path / "lora2.pth")
    both = RWKV(path, strategy, lora=[(tmp_path / "lora.pth", ALPHA), (tmp_path / "lora2.pth", 4)])
    hand2 = save_checkpoint(merged_by_hand(merged_by_hand(base, adapter(), ALPHA), adapter(1), 4), tmp_path / "hand2.pth")
    assert torch.equal(both.forward(TOKENS, None)[0], RWKV(hand2, strategy).forward(TOKENS, None)[0])


def test_convert_merges_a_lora_into_the_written_model(source, tmp_path):
    torch.save(adapter(), tmp_path / "lora.pth")
    assert main(["convert", str(source[0]), str(tmp_path / "merged.pth"), "--lora", str(tmp_path / "lora.pth"), str(ALPHA)]) == 0
    expected = RWKV(source[0], "cpu fp32", lora=[(tmp_path / "lora.pth", ALPHA)]).forward(TOKENS, None)[0]
    assert torch.equal(RWKV(tmp_path / "merged.pth", "cpu fp32").forward(TOKENS, None)[0], expected)
    assert main(["convert", str(source[0]), str(tmp_path / "x.pth"), "--lora", str(tmp_path / "lora.pth"), "sixteen"]) == 2


def test_bad_lora_files_are_refused(source, tmp_path):
    path = source[0]
    lora = adapter()
    cases = {
        "other_model": ({**lora, "blocks.0.att.receptance.lora_B": torch.zeros(64, RANK)}, r"lora_B \[64, 8\] @ lora_A \[8, 128\] does not make the model's \[128, 128\]"),
        "unknown_target": ({"blocks.9.att.key.lora_A": torch.zeros(RANK, 128), "blocks.9.att.key.lora_B": torch.zeros(128, RANK)}, "adapts 'blocks.9.att.key.weight', which the model does not have"),
        "half_pair": (_drop(lora, "blocks.1.att.value.lora_B"), "'blocks.1.att.value.lora_A' without its 'blocks.1.att.value.lora_B'"),
        "no_lora": ({"blocks.1.ln1.weight": torch.ones(128)}, r"no '\*.lora_A' tensors"),
    }
    for name, (data, message) in cases.items():
        torch.save(data, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=message):
            RWKV(path, lora=[(tmp_path / f"{name}.pth", 8)])
    with pytest.raises(CheckpointError, match="LoRA file not found"):
        RWKV(path, lora=[(tmp_path / "nope.pth", 8)])
    with pytest.raises(InputError, match="expected {path: FILE, alpha: NUMBER}"):
        RWKV(path, lora=[str(tmp_path / "lora.pth")])


# ---- rwkvkit convert


def test_convert_round_trip_is_bit_exact(tmp_path, capsys):
    tensors = {k: v for k, v in random_checkpoint(SPEC, seed=9, dtype=torch.bfloat16).items() if k not in UNUSED}
    src = save_checkpoint(tensors, tmp_path / "src.pth")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--max-shard-size", "300KB"]) == 0
    assert "read back and verified" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k].view(torch.int16), t.view(torch.int16)), k
    for path in ("hf", "m.safetensors", "back.pth"):
        assert main(["info", str(tmp_path / path)]) == 0
    assert "format     .pth file, bfloat16" in capsys.readouterr().out


def test_convert_keeps_every_tensor_the_model_reads_and_casts_on_request(source, reference, tmp_path):
    path, base = source
    done = convert(path, tmp_path / "hf")
    assert set(load_checkpoint(done.path).tensors) == set(base) - UNUSED  # fla's layout has no place for them
    assert rel_diff(RWKV(done.path, "cpu fp32").forward(TOKENS, None)[0], reference) <= 1e-6
    half = convert(path, tmp_path / "half.safetensors", dtype="bf16")
    loaded = load_checkpoint(half.path).tensors
    assert all(torch.equal(loaded[k], base[k].to(torch.bfloat16)) for k in base)


def test_convert_never_overwrites_without_force(source, tmp_path):
    path = source[0]
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"user data")
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert(path, target)
    assert target.read_bytes() == b"user data"
    convert(path, target, force=True)
    assert load_checkpoint(target).spec == SPEC
    folder = tmp_path / "hf"
    folder.mkdir()  # an empty folder holds nothing to replace
    convert(path, folder, max_shard_bytes=300_000)
    (folder / "README.md").write_text("mine")
    convert(path, folder, force=True)  # one file now: the old shards go, the user's file stays
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with pytest.raises(ConvertError, match="is the source itself"):
        convert(path, path, force=True)
    with pytest.raises(ConvertError, match="unknown destination format '.bin'"):
        convert(path, tmp_path / "x.bin")
    sized = convert(path, tmp_path / "rwkv7-world-0.1B")  # a model-size name is a folder, not a ".1B" file
    assert sized.kind == "hf" and (tmp_path / "rwkv7-world-0.1B" / "config.json").is_file()
    assert main(["convert", str(path), str(target)]) == 2


def test_convert_refuses_damaged_and_foreign_input(tmp_path, capsys):
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    assert main(["convert", str(tmp_path / "cut.pth"), str(tmp_path / "out.pth")]) == 2
    assert "not a readable PyTorch/safetensors checkpoint" in capsys.readouterr().err
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "llama.safetensors"))
    assert main(["convert", str(tmp_path / "llama.safetensors"), str(tmp_path / "out.pth")]) == 2
    assert "this is not an RWKV checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_convert_checks_what_it_wrote_before_it_replaces_anything(source, tmp_path, monkeypatch):
    from rwkvkit.formats import convert as module

    real = module.hf.read_folder

    def corrupted(folder):
        tensors = real(folder)
        tensors["head.weight"] = tensors["head.weight"] + 1
        return tensors

    monkeypatch.setattr(module.hf, "read_folder", corrupted)
    with pytest.raises(ConvertError, match="reads back with different tensors"):
        convert(source[0], tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # nothing left: no folder, no temporary


# ---- rwkvkit run with a folder, a tuned state and a LoRA


def test_run_takes_a_folder_a_tuned_state_and_a_lora(source, tmp_path):
    import subprocess
    import sys

    folder = convert(source[0], tmp_path / "hf").path
    shutil.copyfile(str(resources.files("rwkvkit.demo").joinpath("tokenizer.json")), folder / "tokenizer.json")
    torch.save(time_states(), tmp_path / "tuned.pth")
    torch.save(adapter(), tmp_path / "lora.pth")
    overrides = ["model=hf", f"model.path={folder}", f"model.state={tmp_path / 'tuned.pth'}", f"model.lora=[{{path: {tmp_path / 'lora.pth'}, alpha: {ALPHA}}}]"]
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rwkvkit.cli", "run", *overrides, "sampling=greedy", "token_count=6", "prompt=Once", f"hydra.run.dir={out}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    model = RWKV(folder, "cpu fp32", lora=[(tmp_path / "lora.pth", ALPHA)])
    pipeline = PIPELINE(model, folder)
    expected = pipeline.generate("Once", 6, PIPELINE_ARGS(temperature=0, alpha_frequency=0, alpha_presence=0), state=State.from_tuned(tmp_path / "tuned.pth", model))
    assert (out / "output.txt").read_text() == expected
    assert json.loads((out / "run.json").read_text())["model_fingerprint"] == model.fingerprint


# ---- RWKV-6/5/4: Hugging Face folders, tuned states, merged-state model files

OLDER = ("rwkv6", "rwkv5", "rwkv4")
MODEL_TYPES = {"rwkv6": "rwkv6", "rwkv5": "rwkv5", "rwkv4": "rwkv"}


def transformers_style(blink: dict[str, torch.Tensor], gen: str) -> dict[str, torch.Tensor]:
    """BlinkDL -> HF names as the published conversion scripts' ``convert_state_dict`` does
    (transformers' convert_rwkv_checkpoint_to_hf.py for RWKV-4, BBuf/RWKV-World-HF-Tokenizer's
    convert_rwkv5/6_checkpoint_to_hf.py): renames only, tensors as they are."""
    import re

    out = {}
    for name, t in blink.items():
        if name.startswith("emb."):
            name = name.replace("emb.", "embeddings.")
        if name.startswith("blocks.0.ln0"):
            name = name.replace("blocks.0.ln0", "blocks.0.pre_ln")
        name = re.sub(r"blocks\.(\d+)\.att", r"blocks.\1.attention", name)
        name = re.sub(r"blocks\.(\d+)\.ffn", r"blocks.\1.feed_forward", name)
        if gen != "rwkv6":  # RWKV-6's time_maa_* keep their names
            for short, long in (("k", "key"), ("v", "value"), ("r", "receptance"), ("g", "gate")):
                if name.endswith(f".time_mix_{short}"):
                    name = name.replace(f".time_mix_{short}", f".time_mix_{long}")
        out[name if name == "head.weight" else "rwkv." + name] = t.contiguous()
    return out


@pytest.fixture(scope="module")
def older(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("older")
    out = {}
    for gen in OLDER:
        tensors = random_checkpoint(make_spec(2, 128, 4096, architecture=gen), seed=11)
        out[gen] = save_checkpoint(tensors, root / f"{gen}.pth"), tensors
    return out


@pytest.mark.parametrize("gen", OLDER)
def test_older_generations_hf_folders_give_the_source_logits(older, tmp_path, capsys, gen):
    path, tensors = older[gen]
    config = {"model_type": MODEL_TYPES[gen], "hidden_size": 128, "num_hidden_layers": 2, "vocab_size": 4096, "rescale_every": 6, "layer_norm_epsilon": 1e-5}
    folder = make_folder(tmp_path / "hf", transformers_style(tensors, gen), shards=2, config=config)
    shutil.copyfile(str(resources.files("rwkvkit.demo").joinpath("tokenizer.json")), folder / "tokenizer.json")
    source = RWKV(path, "cpu fp32")
    model = RWKV(folder, "cpu fp32")
    assert rel_diff(model.forward(TOKENS, None)[0], source.forward(TOKENS, None)[0]) <= 1e-6
    assert model.fingerprint == source.fingerprint
    assert resolve_tokenizer(folder).encode("Hello") == resolve_tokenizer("pkg://rwkvkit.demo/tokenizer.json").encode("Hello")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"Hugging Face folder, model_type {MODEL_TYPES[gen]}, 2 safetensors files, tokenizer tokenizer.json" in out
    assert f"architecture {gen}" in out
    # rwkvkit convert writes the same layout, and back to .pth bit-exactly
    assert main(["convert", str(path), str(tmp_path / "ours")]) == 0
    written = hf.read_raw(tmp_path / "ours")
    assert written.keys() == transformers_style(tensors, gen).keys()
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k].reshape(t.shape), t) for k, t in tensors.items())


def test_older_hf_folder_contradicting_its_config_is_refused(older, tmp_path):
    folder = make_folder(tmp_path / "hf", transformers_style(older["rwkv6"][1], "rwkv6"), config={"model_type": "rwkv6", "head_size": 32})
    with pytest.raises(CheckpointError, match="head_size=32 but the weights have 64"):
        load_checkpoint(folder)
    folder = make_folder(tmp_path / "hf5", {**transformers_style(older["rwkv5"][1], "rwkv5"), "rwkv.blocks.0.attention.time_mix_k": torch.zeros(1, 1, 128)}, config={"model_type": "rwkv5"})
    with pytest.raises(CheckpointError, match="unexpected key"):  # RWKV-5's HF name is time_mix_key
        load_checkpoint(folder)


def older_states(gen: str, seed: int = 4) -> dict[str, torch.Tensor]:
    gen_ = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.att.time_state": torch.randn(2, 64, 64, generator=gen_) * 0.5 for i in range(2)}


@pytest.mark.parametrize("gen", ("rwkv6", "rwkv5"))
def test_rwkv5_and_6_tuned_states_start_where_the_oracle_starts(older, tmp_path, gen):
    """rwkv 0.8.32 starts an RWKV-5/6 model file carrying ``time_state`` from it (transposed to its
    key-first state): a merged-state file must start the same here, and a separate state file
    applied by hand must equal it. Tolerance: the fp32 one of test_oracle_parity."""
    path, tensors = older[gen]
    states = older_states(gen)
    merged = save_checkpoint({**tensors, **states}, tmp_path / "merged.pth")
    ref = run_oracle(merged, "cpu fp32", tmp_path, v7=False, runs={"start": {"chunks": [TOKENS], "full_output": False}})["start"]["logits"][0]
    from_file = RWKV(merged, "cpu fp32").forward(TOKENS, None)[0]
    assert rel_diff(from_file, ref) < 2e-5
    plain = RWKV(path, "cpu fp32")
    assert rel_diff(plain.forward(TOKENS, None)[0], ref) > 1e-3  # the state matters: this test can tell
    save_file(states, str(tmp_path / "tuned.safetensors"))
    assert torch.equal(plain.forward(TOKENS, State.from_tuned(tmp_path / "tuned.safetensors", plain))[0], from_file)
    save_file({k: v.transpose(1, 2).contiguous() for k, v in states.items()}, str(tmp_path / "transposed.safetensors"))
    assert rel_diff(plain.forward(TOKENS, State.from_tuned(tmp_path / "transposed.safetensors", plain))[0], ref) > 1e-3


def test_rwkv4_has_no_tuned_state(older, tmp_path):
    torch.save(older_states("rwkv4"), tmp_path / "tuned.pth")
    with pytest.raises(StateError, match="this model is rwkv4: RWKV-4 has no WKV matrix state"):
        State.from_tuned(tmp_path / "tuned.pth", RWKV(older["rwkv4"][0], "cpu fp32"))


def test_merged_state_model_file_starts_from_its_state(source, reference, tmp_path, capsys):
    states = time_states(seed=2)
    merged = save_checkpoint({**source[1], **states}, tmp_path / "merged.pth")
    torch.save(states, tmp_path / "tuned.pth")
    plain = RWKV(source[0], "cpu fp32")
    by_hand = plain.forward(TOKENS, State.from_tuned(tmp_path / "tuned.pth", plain))[0]
    model = RWKV(merged, "cpu fp32")
    assert torch.equal(model.forward(TOKENS, None)[0], by_hand) and rel_diff(by_hand, reference) > 1e-3
    assert torch.equal(model.forward(TOKENS, model.zero_state())[0], reference)  # an explicit state still wins
    tok, greedy = resolve_tokenizer("pkg://rwkvkit.demo/tokenizer.json"), GreedySampler()
    generated = [generate(m, tok, TOKENS, token_count=8, sampler=greedy, state=s).tokens for m, s in ((model, None), (plain, State.from_tuned(tmp_path / "tuned.pth", plain)))]
    assert generated[0] == generated[1]  # the engine (PIPELINE, run, serve) starts from it too
    assert model.fingerprint != plain.fingerprint  # a cache of states or weights must tell them apart
    # the int8 path quantizes the weights only: the state is the same tensors
    q, q_plain = RWKV(merged, "cpu fp32i8"), RWKV(source[0], "cpu fp32i8")
    assert torch.equal(q.forward(TOKENS, None)[0], q_plain.forward(TOKENS, State.from_tuned(tmp_path / "tuned.pth", q_plain))[0])
    assert main(["info", str(merged)]) == 0
    assert "carries a tuned initial state (3 x blocks.N.att.time_state)" in capsys.readouterr().out
    assert RWKV(convert(merged, tmp_path / "m.safetensors").path, "cpu fp32").fingerprint == model.fingerprint  # kept
    with pytest.raises(ConvertError, match="has no place for"):
        convert(merged, tmp_path / "hf")
    bad = save_checkpoint({**source[1], **time_states(n_layer=2)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth: no state for layer 2"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="holds only tuned states"):
        load_checkpoint(tmp_path / "tuned.pth")


def test_an_hf_vocab_txt_is_read_as_the_world_vocabulary(tmp_path):
    """RWKV/v5-Eagle-*-HF and v6-Finch-*-HF ship ``vocab.txt`` as Rwkv5Tokenizer.save_vocabulary
    writes it: ``str(token)`` of each id's bytes, one per line, line 0 the ``b'<s>'`` placeholder."""
    import ast

    world = resources.files("rwkvkit.plugins").joinpath("rwkv_vocab_v20230424.txt").read_text(encoding="utf-8")
    tokens = {}
    for line in world.splitlines():
        head, _, rest = line.partition(" ")
        token = ast.literal_eval(rest.rpartition(" ")[0])
        tokens[int(head)] = token.encode("utf-8") if isinstance(token, str) else token
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(str(t) for t in [b"<s>", *(tokens[i] for i in range(1, max(tokens) + 1))]) + "\n", encoding="utf-8")
    text = "Hello, world! 你好\n\nUser: hi"
    assert resolve_tokenizer(folder).encode(text) == resolve_tokenizer("rwkv_vocab_v20230424").encode(text)
    (folder / "vocab.txt").write_text("b'<s>'\n[PAD]\n", encoding="utf-8")  # a BERT-style vocab.txt
    with pytest.raises(TokenizerError, match=r"vocab.txt:2: expected a Python bytes literal"):
        resolve_tokenizer(folder)
