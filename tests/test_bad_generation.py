"""Issue 13, the generation loop: stop strings, non-finite logits, callbacks ended on every way out,
bad callbacks and sampler ids, prefill chunks and progress."""

from __future__ import annotations

import json

import pytest

from rwkvkit import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.errors import InputError, PluginError, RwkvkitError
from rwkvkit.generation import AUTO_CHUNK_RANGE, auto_chunk_len, generate
from rwkvkit.interfaces import Callback
from rwkvkit.plugins.callbacks import JsonlCallback, ProgressCallback
from rwkvkit.plugins.samplers import GreedySampler
from rwkvkit.resolve import as_callbacks, resolve_tokenizer
from rwkvkit.testing import make_spec, random_checkpoint, save_checkpoint
from test_generation import Scripted

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132]  # ids: the tiny model has 2,048 tokens


@pytest.fixture(scope="module")
def tiny(model_paths):
    return RWKV(model_paths["tiny"], "cpu fp32")


@pytest.fixture(scope="module")
def tok():
    return resolve_tokenizer("rwkv_vocab_v20230424")


def spell(tok, text: str) -> list[int]:
    """One single-byte token per character (ids < 256, inside the tiny model's vocabulary)."""
    return [next(i for i in range(1, 257) if tok.decode_bytes([i]) == ch.encode()) for ch in text]


class Recorder(Callback):
    def __init__(self, fail_on_token: int | None = None, raise_: BaseException | None = None):
        self.events, self.fail_on_token, self.raise_ = [], fail_on_token, raise_

    def on_start(self, run):
        self.events.append(("start",))

    def on_prefill(self, done, total):
        self.events.append(("prefill", done, total))

    def on_token(self, token):
        self.events.append(("token", token))
        if len([e for e in self.events if e[0] == "token"]) == self.fail_on_token:
            raise self.raise_

    def on_text(self, piece):
        self.events.append(("text", piece))

    def on_end(self, result):
        self.events.append(("end", result.stop_reason, result.text))

    def streamed(self) -> str:
        return "".join(e[1] for e in self.events if e[0] == "text")


# --- stop strings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stops, expected, stop",
    [
        ("ab\n\ncd", ["\n\n"], "ab", "\n\n"),
        ("ab\ncd\n\nef", ["\n\n"], "ab\ncd", "\n\n"),  # a lone "\n" is held back, then released
        ("xEND", ["END", "ND"], "x", "END"),  # the earliest match wins
        ("abcd", ["cx"], "abcd", None),  # held "c" released at the end (length stop)
    ],
)
def test_stop_strings(tiny, tok, text, stops, expected, stop):
    ids = spell(tok, text)
    rec = Recorder()
    result = generate(tiny, tok, PROMPT, token_count=len(ids), sampler=Scripted(ids), stop_tokens=stops, callbacks=[rec])
    assert result.text == rec.streamed() == expected
    assert all(s not in piece for s in stops for e in rec.events if e[0] == "text" for piece in [e[1]])
    assert (result.stop_reason, result.stop) == (("stop_string", stop) if stop else ("length", None))
    assert rec.events[-1] == ("end", result.stop_reason, expected)


def test_text_that_may_begin_a_stop_string_is_held_back(tiny, tok):
    ids = spell(tok, "a\nb\n\n")
    rec = Recorder()
    generate(tiny, tok, PROMPT, token_count=len(ids), sampler=Scripted(ids), stop_tokens=["\n\n"], callbacks=[rec])
    texts = [e[1] for e in rec.events if e[0] == "text"]
    assert texts == ["a", "\nb"]  # "\n" waited for the next token


def test_stop_ids_and_strings_together_through_pipeline(tiny, tok):
    ids = spell(tok, "hi!x")
    args = PIPELINE_ARGS(token_stop=[ids[2], "zz"], temperature=0)
    result = PIPELINE(tiny, tok).generate(PROMPT, 4, args, sampler=Scripted(ids), return_result=True)
    assert (result.text, result.stop_reason, result.stop) == ("hi", "stop_token", ids[2])


@pytest.mark.parametrize("stops, message", [([1.5], r"token_stop has \[1.5\]"), ([None], r"token_stop has \[None\]"), ([True], r"token_stop has \[True\]")])
def test_bad_stop_tokens(tiny, tok, stops, message):
    with pytest.raises(InputError, match=message):
        generate(tiny, tok, PROMPT, token_count=2, sampler=GreedySampler(), stop_tokens=stops)


def test_stop_strings_set_after_construction_are_checked(tiny, tok):
    args = PIPELINE_ARGS()
    args.token_stop = ["\n", 2.5]
    with pytest.raises(InputError, match=r"token_stop has \[2.5\]"):
        PIPELINE(tiny, tok).generate(PROMPT, 2, args)


# --- non-finite logits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Layer 1's FFN value matrix holds a NaN; token 7's embedding row is +inf."""
    tensors = random_checkpoint(make_spec(3, 128, 2048), seed=3)
    tensors["blocks.1.ffn.value.weight"][5, 5] = float("nan")
    path = save_checkpoint(tensors, tmp_path_factory.mktemp("nan") / "nan.pth")
    clean = dict(tensors, **{"blocks.1.ffn.value.weight": random_checkpoint(make_spec(3, 128, 2048), seed=3)["blocks.1.ffn.value.weight"]})
    clean["emb.weight"][7] = float("inf")
    return RWKV(path, "cpu fp32"), RWKV(save_checkpoint(clean, path.with_name("inf.pth")), "cpu fp32")


def test_nan_weights_are_named_not_blamed_on_bans(poisoned, tok):
    with pytest.raises(RwkvkitError, match=r"non-finite logits \(NaN\) after the prompt's 12 tokens; the first non-finite output is that of layer 1 \(blocks\.1\.\*\)"):
        generate(poisoned[0], tok, PROMPT, token_count=3, sampler=GreedySampler(), chunk_len=5)


def test_non_finite_logits_while_decoding(poisoned, tok):
    rec = Recorder()
    with pytest.raises(RwkvkitError, match=r"non-finite logits \(NaN\) at generated token 2; the first non-finite output is that of the embedding"):
        generate(poisoned[1], tok, PROMPT, token_count=3, sampler=Scripted([9, 7, 9]), callbacks=[rec])
    assert rec.events[-1][:2] == ("end", "error")


def test_every_token_banned_still_says_so(tiny, tok):
    from rwkvkit.penalties import Penalties

    with pytest.raises(InputError, match="every token is banned"):
        generate(tiny, tok, PROMPT, token_count=1, sampler=GreedySampler(), penalties=Penalties(ban=list(range(2048))))


# --- callbacks ended on every way out ------------------------------------------------------------


class Stop(KeyboardInterrupt):
    stop_reason = "terminated"


@pytest.mark.parametrize("exc, reason", [(KeyboardInterrupt(), "interrupted"), (Stop(), "terminated"), (ValueError("boom"), "error")])
def test_callbacks_end_on_every_way_out(tiny, tok, tmp_path, exc, reason):
    log = tmp_path / "gen.jsonl"
    jsonl, rec = JsonlCallback(log), Recorder(fail_on_token=3, raise_=exc)
    with pytest.raises(type(exc)):
        generate(tiny, tok, PROMPT, token_count=10, sampler=GreedySampler(), callbacks=[jsonl, rec])
    assert jsonl._file.closed
    end = json.loads(log.read_text().splitlines()[-1])
    assert end["event"] == "end" and end["stop_reason"] == reason and len(end["tokens"]) == 3
    assert rec.events[-1][:2] == ("end", reason)


class FailingEnd(Callback):
    def on_end(self, result):
        raise RuntimeError("on_end broke")


def test_a_failing_on_end_masks_nothing(tiny, tok):
    rec = Recorder(fail_on_token=1, raise_=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as info:
        generate(tiny, tok, PROMPT, token_count=5, sampler=GreedySampler(), callbacks=[FailingEnd(), rec])
    assert rec.events[-1][:2] == ("end", "interrupted")  # still ended after the failing one
    assert "FailingEnd.on_end also failed" in "".join(info.value.__notes__)


def test_a_failing_on_end_is_raised_after_every_callback_ended(tiny, tok):
    rec = Recorder()
    with pytest.raises(RuntimeError, match="on_end broke"):
        generate(tiny, tok, PROMPT, token_count=2, sampler=GreedySampler(), callbacks=[FailingEnd(), rec])
    assert rec.events[-1][:2] == ("end", "length")


# --- bad callbacks and sampler ids ------------------------------------------------------------


@pytest.mark.parametrize("value", [123, 4.5, object()])
def test_bad_callback_value(value):
    with pytest.raises(InputError, match=r"callback=.*: expected a Callback, a function taking text, a registered name, or a list of these"):
        as_callbacks(value)


@pytest.mark.parametrize("bad", [2048, -1, True, 1.5, "7", None])
def test_sampler_returning_a_bad_id_is_named(tiny, tok, bad):
    with pytest.raises(PluginError, match=rf"sampler 'scripted' \(test_generation\.Scripted\) returned {bad!r:.10}.*expected a token id, an int in 0\.\.2047"):
        generate(tiny, tok, PROMPT, token_count=2, sampler=Scripted([bad]))


# --- prefill chunks and progress ---------------------------------------------------------------


def test_prefill_progress_events(tiny, tok):
    rec = Recorder()
    generate(tiny, tok, PROMPT, token_count=1, sampler=GreedySampler(), chunk_len=5, callbacks=[rec])
    assert [e for e in rec.events if e[0] == "prefill"] == [("prefill", 5, 12), ("prefill", 10, 12), ("prefill", 12, 12)]


def test_automatic_chunk_gives_the_same_tokens(tiny, tok):
    assert AUTO_CHUNK_RANGE[0] <= auto_chunk_len(tiny) <= AUTO_CHUNK_RANGE[1]
    chunked = generate(tiny, tok, PROMPT * 30, token_count=5, sampler=GreedySampler(), chunk_len=7)
    auto = generate(tiny, tok, PROMPT * 30, token_count=5, sampler=GreedySampler())
    assert auto.tokens == chunked.tokens


def test_progress_bar_shows_prefill_of_long_prompts(tiny, tok, capsys):
    generate(tiny, tok, PROMPT, token_count=2, sampler=GreedySampler(), chunk_len=5, callbacks=[ProgressCallback()])
    assert "prefill" in capsys.readouterr().err
    generate(tiny, tok, PROMPT, token_count=2, sampler=GreedySampler(), callbacks=[ProgressCallback(decode=False)])
    assert capsys.readouterr().err == ""  # one chunk, no generation bar: nothing to show
