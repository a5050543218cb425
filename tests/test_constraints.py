"""Structured output (rwkvkit.constraints, plugins/constraints.py): every constrained output parses
and validates, on the demo model (its 4,096-token byte-level BPE, no end-of-text token) and on a
random model with the World vocabulary (65,536 ids of raw bytes, end-of-text 0); a constraint that
allows everything changes nothing; constrained and unconstrained sequences share a batch exactly;
bad sources fail before any token; a budget too small never passes for success.
"""

from __future__ import annotations

import gc
import json
import re
import threading

import jsonschema
import lark
import pytest
import torch

from constraint_cases import GRAMMAR, GRAMMAR_GBNF, REGEXES, SCHEMAS
from rwkvkit.compat import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.constraints import Constraint, constraint_from_response_format, constraint_maker
from rwkvkit.engine import Engine, Request
from rwkvkit.errors import ConstraintError, InputError
from rwkvkit.generation import generate
from rwkvkit.interfaces import Callback
from rwkvkit.paths import resolve_file
from rwkvkit.penalties import Penalties
from rwkvkit.plugins.samplers import GreedySampler, NucleusSampler
from rwkvkit.registry import registry
from test_cli_run import rwkvkit_run

SEEDS = 20  # the 20 seeds per schema, run as one batch of 20 sequences per schema
BUDGET = 160  # tokens: the longest case (nested) takes <= 100 bytes, and a token is >= 1 byte
SAMPLING = PIPELINE_ARGS(temperature=1.0, top_p=0.9, alpha_frequency=0.0, alpha_presence=0.0)


@pytest.fixture(scope="module")
def pipes(model_paths):
    """``demo`` and ``world`` pipelines, loaded once for the module and released at its end."""
    loaded = {
        "demo": PIPELINE(RWKV(resolve_file("pkg://rwkvkit.demo/demo.pth"), "cpu fp32"), "pkg://rwkvkit.demo/tokenizer.json"),
        "world": PIPELINE(RWKV(model_paths["world"], "cpu fp32"), "rwkv_vocab_v20230424"),
    }
    yield loaded
    loaded.clear()  # unmap the checkpoints now: later tests check that nothing keeps a mapping
    gc.collect()


def run(pipe: PIPELINE, constraint, prompts: int = SEEDS, token_count: int = BUDGET, args: PIPELINE_ARGS = SAMPLING):
    """``prompts`` sequences in one batch, seeds 0, 1, ...: their results."""
    return pipe.generate(["Here it is:"] * prompts, token_count, args, seed=list(range(prompts)), constraint=constraint, return_result=True)


def completed(results) -> list[str]:
    """The texts, after checking every sequence ended because its constraint was complete."""
    assert [r.stop_reason for r in results] == ["constraint"] * len(results), [(r.stop_reason, r.text) for r in results]
    return [r.text for r in results]


@pytest.mark.slow  # 20 sequences x up to 100 steps: 43-120 s each on a heavily shared 2-core machine
@pytest.mark.parametrize("model", ["demo", "world"])
@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_json_schema_outputs_validate(pipes, model, schema):
    texts = completed(run(pipes[model], {"json_schema": SCHEMAS[schema]}))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[schema])
    assert len(set(texts)) > 1  # the seeds sampled different outputs: the mask did not force one


@pytest.mark.parametrize("model", ["demo", "world"])
@pytest.mark.parametrize("pattern", sorted(REGEXES))
def test_regex_outputs_fullmatch(pipes, model, pattern):
    results = run(pipes[model], {"regex": REGEXES[pattern]}, prompts=8, token_count=40)
    for r in results:  # a World model may end with end-of-text once the match is complete
        assert r.stop_reason == "constraint" and re.fullmatch(REGEXES[pattern], r.text), (r.stop_reason, r.text)


@pytest.mark.parametrize("model", ["demo", "world"])
@pytest.mark.parametrize("source", [GRAMMAR, GRAMMAR_GBNF], ids=["lark", "gbnf"])
def test_grammar_outputs_parse_with_lark(pipes, model, source):
    parser = lark.Lark(GRAMMAR)
    for r in run(pipes[model], {"grammar": source}, prompts=8, token_count=80):
        assert r.stop_reason == "constraint", (r.stop_reason, r.text)
        parser.parse(r.text)


class AllowAll(Constraint):
    """Masks nothing and never finishes: the engine's constraint path with no effect."""

    def __init__(self) -> None:
        self.advanced: list[int] = []

    def mask(self, logits: torch.Tensor) -> None:
        pass

    def advance(self, token: int) -> None:
        self.advanced.append(token)

    def is_finished(self) -> bool:
        return False

    def is_accepting(self) -> bool:
        return True


def test_allow_everything_equals_unconstrained_greedy(pipes):
    greedy = PIPELINE_ARGS(temperature=0)
    for pipe in pipes.values():
        plain = pipe.generate("The Lord", 24, greedy, return_result=True)
        allow = AllowAll()
        assert pipe.generate("The Lord", 24, greedy, constraint=allow, return_result=True).tokens == plain.tokens == allow.advanced
    # llguidance with a regex that any UTF-8 text matches: the demo model's greedy text is such text
    demo = pipes["demo"]
    plain = demo.generate("The Lord", 24, greedy, return_result=True)
    anything = demo.generate("The Lord", 24, greedy, constraint={"regex": r"(?s:.*)"}, return_result=True)
    assert (anything.tokens, anything.stop_reason) == (plain.tokens, "length")


@pytest.mark.parametrize("model", ["demo", "world"])
def test_constrained_and_unconstrained_in_one_batch_equal_each_alone(pipes, model):
    pipe = pipes[model]
    sources = [{"json_schema": SCHEMAS["flat"]}, None, {"regex": REGEXES["date"]}, None, {"grammar": GRAMMAR}]

    def req(i: int, source) -> Request:
        maker = constraint_maker(source, pipe.tokenizer) if source else (lambda: None)
        return Request("Here it is:", 48, NucleusSampler(temperature=1.0, top_p=0.9), Penalties(0.2, 0.2, 0.996), seed=10 + i, constraint=maker())

    batched = Engine(pipe.model, pipe.tokenizer, max_batch=8).generate([req(i, s) for i, s in enumerate(sources)])
    for i, (source, got) in enumerate(zip(sources, batched)):
        r = req(i, source)
        want = generate(pipe.model, pipe.tokenizer, r.prompt, token_count=r.token_count, sampler=r.sampler, penalties=r.penalties, seed=r.seed, constraint=r.constraint)
        assert (got.tokens, got.text, got.stop_reason) == (want.tokens, want.text, want.stop_reason)
        assert got.stop_reason == ("length" if source is None else "constraint")


class Ahead(AllowAll):
    """Allows everything for ``steps`` tokens, then only its end token 7; prepares masks ahead and
    records, per call, its thread, its batch and whether the model's forward had begun."""

    calls: list[tuple[bool, int]] = []
    forward_begun = threading.Event()

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.end_tokens, self.prepared, self.masked_prepared = steps, frozenset({7}), False, []

    @classmethod
    def prepare_masks(cls, constraints) -> None:
        begun = cls.forward_begun.wait(60)  # a deadlock guard: never waited for if the engine overlaps
        cls.calls.append((threading.current_thread() is not threading.main_thread() and begun, len(constraints)))
        for c in constraints:
            c.prepared = True

    def mask(self, logits: torch.Tensor) -> None:
        self.masked_prepared.append(self.prepared)
        if len(self.advanced) >= self.steps:
            logits[torch.arange(len(logits)) != 7] = -float("inf")

    def advance(self, token: int) -> None:
        super().advance(token)
        self.prepared = False


def test_masks_are_prepared_in_a_worker_while_the_model_runs(pipes, monkeypatch):
    """Each forward lets a prepare_masks call begin (waiting for it, so the worker's timing does not
    matter) and that call sees the forward begun: they overlap. One call per step for the whole
    batch; every mask after the first is prepared; an unconstrained row changes nothing."""
    pipe = pipes["demo"]
    forward = pipe.model.forward

    def watched(*args, **kwargs):
        Ahead.forward_begun.set()
        try:
            return forward(*args, **kwargs)
        finally:
            Ahead.forward_begun.clear()

    monkeypatch.setattr(pipe.model, "forward", watched)
    monkeypatch.setattr(Ahead, "calls", [])
    rows = [Ahead(3), None, Ahead(3)]
    results = Engine(pipe.model, pipe.tokenizer).generate([Request("The Lord", 6, GreedySampler(), constraint=c) for c in rows])
    assert [(r.stop_reason, len(r.tokens)) for r in results] == [("constraint", 3), ("length", 6), ("constraint", 3)]
    assert Ahead.calls == [(True, 2)] * 3  # after tokens 1, 2, 3; token 4 is the end token: no forward
    assert rows[0].masked_prepared == rows[2].masked_prepared == [False, True, True, True]


class Failing(AllowAll):
    @classmethod
    def prepare_masks(cls, constraints) -> None:
        raise RuntimeError("prepare failed")


def test_a_failing_prepare_masks_ends_its_sequences_only(pipes):
    pipe = pipes["demo"]
    engine = Engine(pipe.model, pipe.tokenizer)
    failing, plain = (engine.submit(Request("The Lord", 4, GreedySampler(), constraint=c)) for c in (Failing(), None))
    engine.run()
    assert failing.result.stop_reason == "error" and str(failing.error) == "prepare failed" and len(failing.result.tokens) == 1
    assert plain.result.tokens == generate(pipe.model, pipe.tokenizer, "The Lord", token_count=4, sampler=GreedySampler()).tokens


@pytest.mark.parametrize("model", ["demo", "world"])
def test_a_prepared_mask_equals_llguidance_s_own(pipes, model):
    """Masks made in a batch by prepare_masks, and on demand by mask, equal llguidance's own logit
    bias (one byte per token) for the same state: the bit order and the vocabulary's end match."""
    tokenizer = pipes[model].tokenizer
    make = constraint_maker({"json_schema": SCHEMAS["nested"]}, tokenizer)
    text = tokenizer.encode('{"user":{"id":12,"role":"')
    ahead, on_demand, other = make(), make(), constraint_maker({"regex": REGEXES["date"]}, tokenizer)()
    for c in (ahead, on_demand):
        for token in text:
            c.advance(token)
    type(ahead).prepare_masks([ahead, other])
    vocab = pipes[model].model.spec.vocab_size  # the demo's model has ids past its tokenizer's
    want = torch.frombuffer(bytearray(ahead._matcher.deep_copy().compute_logit_bias()), dtype=torch.uint8)[: tokenizer.vocab_size] > 0
    for c in (ahead, on_demand):
        logits = torch.randn(vocab)
        c.mask(logits)
        assert torch.equal(torch.isfinite(logits)[: tokenizer.vocab_size], want) and not torch.isfinite(logits[tokenizer.vocab_size :]).any()
    assert 3 <= int(want.sum()) < 1000  # "admin", "editor", "viewer" and their prefixes: a real mask, not all or nothing


def test_budget_too_small_is_not_success(pipes):
    result = run(pipes["world"], {"json_schema": SCHEMAS["flat"]}, prompts=1, token_count=3)[0]
    assert result.stop_reason == "constraint_incomplete" and len(result.tokens) == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)
    assert run(pipes["world"], {"json_schema": SCHEMAS["flat"]}, prompts=1, token_count=0)[0].stop_reason == "constraint_incomplete"


def test_a_constraint_that_allows_only_banned_tokens_is_an_error(pipes):
    pipe = pipes["demo"]
    digits = [i for i in range(pipe.tokenizer.vocab_size) if pipe.tokenizer.decode_bytes([i]).isdigit()]
    args = PIPELINE_ARGS(temperature=0, token_ban=digits)
    with pytest.raises(InputError, match="the constraint allows only banned tokens"):
        pipe.generate("x", 5, args, constraint={"regex": "[0-9]+"})


class Started(Callback):
    def __init__(self) -> None:
        self.started = False

    def on_start(self, run) -> None:
        self.started = True


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"json_schema": {"type": "objekt"}}, "constraint json_schema: Invalid type: objekt"),
        ({"json_schema": "{not json"}, "constraint json_schema: not valid JSON"),
        ({"json_schema": 3}, "expected a JSON schema"),
        ({"regex": "[a-"}, "(?s)constraint regex: .*unclosed character class"),
        ({"regex": 5}, "constraint regex: expected a pattern string"),
        ({"grammar": "start: undefined_rule"}, '(?s)constraint grammar: .*unknown name: "undefined_rule"'),
        ({"grammar": "root ::= [a-"}, "constraint grammar: not valid GBNF"),
    ],
)
def test_a_bad_source_fails_before_any_token(pipes, spec, message):
    started = Started()
    with pytest.raises(ConstraintError, match=message):
        pipes["demo"].generate("x", 5, constraint=spec, callback=started)
    assert not started.started


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"yaml_schema": {}}, "constraint kind 'yaml_schema' is unknown; available: grammar, json_schema, regex"),
        ({"regex": "a", "grammar": "start: 'a'"}, "expected exactly one of"),
        ("[0-9]+", "expected an rwkvkit.constraints.Constraint object"),
    ],
)
def test_a_bad_spec_names_what_is_expected(pipes, spec, message):
    with pytest.raises(InputError, match=re.escape(message)):
        pipes["demo"].generate("x", 5, constraint=spec)


def test_a_constraint_object_is_for_one_sequence(pipes):
    pipe = pipes["demo"]
    with pytest.raises(InputError, match="a Constraint object holds one sequence's state"):
        pipe.generate(["a", "b"], 3, constraint=AllowAll())
    shared = AllowAll()
    with pytest.raises(InputError, match="share one AllowAll object"):
        Engine(pipe.model, pipe.tokenizer).generate([Request("a", 2, GreedySampler(), constraint=shared), Request("b", 2, GreedySampler(), constraint=shared)])
    with pytest.raises(InputError, match="constraint='nope'"):
        generate(pipe.model, pipe.tokenizer, "a", token_count=2, sampler=GreedySampler(), constraint="nope")


def test_the_built_in_kinds_are_registered():
    assert {"json_schema", "regex", "grammar"} <= set(registry.names("constraints"))


@pytest.mark.parametrize(
    "response_format, spec",
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"json_schema": {"type": "object"}}),
        ({"type": "json_schema", "json_schema": {"name": "flat", "schema": SCHEMAS["flat"], "strict": True}}, {"json_schema": SCHEMAS["flat"]}),
    ],
)
def test_response_format_becomes_a_constraint_spec(response_format, spec):
    assert constraint_from_response_format(response_format) == spec


@pytest.mark.parametrize(
    "response_format, message",
    [
        ({"type": "xml"}, "response_format.type='xml': expected 'text', 'json_object' or 'json_schema'"),
        ({"type": "json_schema"}, "response_format.json_schema: expected an object"),
        ({"type": "json_schema", "json_schema": {"schema": "[1,"}}, "response_format.json_schema.schema: not valid JSON"),
        ("json", "expected an object with a string 'type'"),
    ],
)
def test_a_bad_response_format_names_the_part(response_format, message):
    with pytest.raises((InputError, ConstraintError), match=re.escape(message)):
        constraint_from_response_format(response_format)


def test_json_object_response_format_generates_an_object(pipes):
    result = pipes["demo"].generate("x", 120, SAMPLING, seed=3, constraint=constraint_from_response_format({"type": "json_object"}), return_result=True)
    assert result.stop_reason in ("constraint", "constraint_incomplete")  # an open object may outlast any budget
    if result.stop_reason == "constraint":
        assert isinstance(json.loads(result.text), dict)


def test_cli_run_with_a_json_schema_file(tmp_path):
    (tmp_path / "flat.json").write_text(json.dumps(SCHEMAS["flat"]))
    proc = rwkvkit_run("constraint.json_schema=flat.json", "token_count=80", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["stop_reason"] == "constraint"
    jsonschema.validate(json.loads((tmp_path / "run" / "output.txt").read_text()), SCHEMAS["flat"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["constraint.json_schema=bad.json"], "constraint.json_schema=bad.json: constraint json_schema: Invalid type: objekt"),
        (["constraint.grammar=missing.lark"], "constraint.grammar=missing.lark: cannot read it as a UTF-8 file"),
        (["constraint.regex=a", "constraint.grammar=g.lark"], "set at most one of json_schema, regex and grammar"),
    ],
)
def test_cli_bad_constraint_fails_before_generating(tmp_path, args, message):
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    proc = rwkvkit_run(*args, "token_count=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
