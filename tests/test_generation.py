"""Generation: greedy parity with ChatRWKV's PIPELINE, streaming, state continuation, callbacks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_oracle
from rwkvkit import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.errors import InputError, PluginError
from rwkvkit.generation import generate
from rwkvkit.interfaces import Callback, Sampler
from rwkvkit.plugins.callbacks import JsonlCallback, MetricsCallback
from rwkvkit.plugins.samplers import GreedySampler

PROMPT = "\nIn a shocking finding, scientist discovered a herd of dragons living in a remote valley."
SEED_ARGS = dict(temperature=1.0, top_p=0.7, top_k=100, alpha_frequency=0.25, alpha_presence=0.25, alpha_decay=0.996, token_ban=[0], token_stop=[], chunk_len=256)


def greedy_cases(stop_token: int) -> dict[str, dict]:
    return {
        "plain": dict(args=dict(temperature=0, alpha_frequency=0, alpha_presence=0)),
        "penalties_and_bans": dict(args=dict(SEED_ARGS, temperature=0, token_ban=[0, 11, 33, 261])),
        "top_p_zero": dict(args=dict(SEED_ARGS, temperature=1.0, top_p=0)),
        "chunked_prefill": dict(args=dict(SEED_ARGS, temperature=0, chunk_len=5)),
        "stop_token": dict(args=dict(temperature=0, alpha_frequency=0, alpha_presence=0, token_stop=[stop_token])),
    }


@pytest.fixture(scope="module")
def world(model_paths):
    return RWKV(model_paths["world"], "cpu fp32")


@pytest.fixture(scope="module")
def plain_greedy(world):
    return PIPELINE(world, "rwkv_vocab_v20230424").generate(PROMPT, 40, PIPELINE_ARGS(**greedy_cases(0)["plain"]["args"]), return_result=True)


@pytest.fixture(scope="module")
def oracle_generations(model_paths, plain_greedy, tmp_path_factory):
    cases = greedy_cases(stop_token=plain_greedy.tokens[7])
    gens = {name: {"prompt": PROMPT, "token_count": 40, "args": case["args"]} for name, case in cases.items()}
    return cases, run_oracle(model_paths["world"], "cpu fp32", tmp_path_factory.mktemp("gen"), generations=gens)


@pytest.mark.parametrize("case", sorted(greedy_cases(0)))
def test_greedy_generate_matches_chatrwkv(world, oracle_generations, case):
    cases, oracle = oracle_generations
    result = PIPELINE(world, "rwkv_vocab_v20230424").generate(PROMPT, 40, PIPELINE_ARGS(**cases[case]["args"]), return_result=True)
    theirs = oracle[case]
    stopped = cases[case]["args"].get("token_stop") and theirs["sampled"][-1] in cases[case]["args"]["token_stop"]
    assert result.tokens == (theirs["sampled"][:-1] if stopped else theirs["sampled"])
    assert result.text == theirs["text"]
    assert result.stop_reason == ("stop_token" if stopped else "length")


def test_seed_program_runs_unchanged(world, capsys):
    """The ChatRWKV seed program, with only the import line changed."""
    pipeline = PIPELINE(world, "rwkv_vocab_v20230424")
    args = PIPELINE_ARGS(**SEED_ARGS)

    def my_print(s):
        print(s, end="", flush=True)

    text = pipeline.generate("\nIn a shocking finding,", token_count=50, args=args, callback=my_print)
    assert capsys.readouterr().out == text and len(text) > 0
    assert pipeline.decode(pipeline.encode("Hello world")) == "Hello world"
    assert isinstance(pipeline.sample_logits(torch.randn(65536), temperature=1.0, top_p=0.5), int)


def test_same_seed_same_text_different_seed_different_text(world):
    pipeline = PIPELINE(world, "rwkv_vocab_v20230424")
    args = PIPELINE_ARGS(**SEED_ARGS)
    a, b, c = (pipeline.generate(PROMPT, 30, args, seed=s) for s in (5, 5, 6))
    assert a == b and a != c
    assert PIPELINE(world, "rwkv_vocab_v20230424", seed=9).generate(PROMPT, 30, args) == PIPELINE(world, "rwkv_vocab_v20230424", seed=9).generate(PROMPT, 30, args)


def test_state_continuation(world, plain_greedy):
    """The returned state covers the prompt and every generated token: continuing from it with the
    token greedy would pick next reproduces the uninterrupted run."""
    pipeline = PIPELINE(world, "rwkv_vocab_v20230424")
    first = generate(world, pipeline.tokenizer, PROMPT, token_count=4, sampler=GreedySampler())
    assert first.tokens == plain_greedy.tokens[:4]
    rest = generate(world, pipeline.tokenizer, plain_greedy.tokens[4:5], token_count=5, sampler=GreedySampler(), state=first.state)
    assert rest.tokens == plain_greedy.tokens[5:10]


class Scripted(Sampler):
    """Returns fixed token ids: lets tests drive generation through chosen byte sequences."""

    name = "scripted"

    def __init__(self, ids):
        self.ids = iter(ids)

    def sample(self, logits, ctx):
        return next(self.ids)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_start(self, run):
        self.events.append(("start", run.prompt_tokens))

    def on_token(self, token):
        self.events.append(("token", token))

    def on_text(self, piece):
        self.events.append(("text", piece))

    def on_end(self, result):
        self.events.append(("end", result.text))


def byte_token(tokenizer, b: bytes) -> int:
    return next(i for i in range(1, 300) if tokenizer.decode_bytes([i]) == b)


def test_streaming_never_splits_a_character(world):
    tok = PIPELINE(world, "rwkv_vocab_v20230424").tokenizer
    e_acute = [byte_token(tok, b"\xc3"), byte_token(tok, b"\xa9")]  # "é" as two byte tokens
    emoji = [byte_token(tok, bytes([b])) for b in "😀".encode()]
    ids = e_acute + tok.encode("ok") + emoji + [byte_token(tok, b"\xc3")]  # ends with half a character
    rec = Recorder()
    result = generate(world, tok, "x", token_count=len(ids), sampler=Scripted(ids), callbacks=[rec])
    texts = [e[1] for e in rec.events if e[0] == "text"]
    assert texts[:3] == ["é", "ok", "😀"] and texts[-1] == "\ufffd"  # the dangling byte, flushed at the end
    assert result.text == "".join(texts) == tok.decode(ids, errors="replace")
    assert [e[1] for e in rec.events if e[0] == "token"] == ids
    assert rec.events[0] == ("start", 1) and rec.events[-1] == ("end", result.text)


def test_builtin_callbacks(world, tmp_path, capsys):
    tok = PIPELINE(world, "rwkv_vocab_v20230424").tokenizer
    log = tmp_path / "run.jsonl"
    log.write_text('{"event": "earlier run"}\n')
    metrics = MetricsCallback()
    result = generate(world, tok, PROMPT, token_count=8, sampler=GreedySampler(), callbacks=[metrics, JsonlCallback(log), *map(_by_name, ["stdout", "progress"])])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {"event": "earlier run"}  # appended, never truncated
    assert lines[1]["event"] == "start" and lines[-1]["event"] == "end" and lines[-1]["tokens"] == result.tokens
    assert sum(1 for line in lines if line["event"] == "token") == 8
    assert capsys.readouterr().out == result.text + "\n"
    for key in ("time_to_first_token_s", "prefill_tok_per_s", "decode_tok_per_s"):
        assert result.metrics[key] > 0 and metrics.metrics[key] == result.metrics[key]


def _by_name(name):
    from rwkvkit.registry import registry

    return registry.get("callbacks", name)()


def _set_after_construction(**options):
    """As ChatRWKV programs do (``args.top_p = ...``): bypasses the constructor's checks."""
    args = PIPELINE_ARGS()
    vars(args).update(options)
    return args


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(token_count=-1), InputError, "token_count=-1"),
        (dict(args=_set_after_construction(top_p=1.5)), InputError, "top_p=1.5"),
        (dict(args=_set_after_construction(temperature=-0.5)), InputError, "temperature=-0.5"),
        (dict(args=_set_after_construction(token_ban=[65536])), InputError, "token_ban has id"),
        (dict(args=_set_after_construction(chunk_len=0)), InputError, "chunk_len=0"),
        (dict(sampler="nope"), PluginError, "unknown sampler 'nope'; available: greedy, min_p, nucleus, typical"),
        (dict(sampler="min_p", sampler_options={"top_q": 1}), InputError, "does not accept options"),
        (dict(callback="nope"), PluginError, "unknown callback 'nope'; available: jsonl, metrics, progress, stdout"),
    ],
)
def test_bad_generation_input(world, kwargs, error, message):
    with pytest.raises(error, match=message):
        PIPELINE(world, "rwkv_vocab_v20230424").generate(PROMPT, **{"token_count": 3, **kwargs})


def test_empty_prompt_and_unknown_tokenizer(world):
    with pytest.raises(InputError, match="prompt is empty"):
        PIPELINE(world, "rwkv_vocab_v20230424").generate("", 3)
    with pytest.raises(PluginError, match="unknown tokenizer 'nope'; available: .*rwkv_world"):
        PIPELINE(world, "nope")


def test_named_sampler_with_options(world):
    text = PIPELINE(world, "rwkv_vocab_v20230424").generate(PROMPT, 10, sampler="min_p", sampler_options={"min_p": 0.1}, seed=1)
    assert isinstance(text, str) and text
