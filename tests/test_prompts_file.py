"""``rwkvkit run prompts_file=X.jsonl``: one batched run over a file of prompts gives each prompt
what ``PIPELINE.generate`` gives it alone (greedy and seeded sampling, per-line overrides), writes
results.jsonl and the run's metrics (the engine's memory included), and refuses bad files with the
file, the line and what was expected."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from rwkvkit import PIPELINE, PIPELINE_ARGS, RWKV
from constraint_cases import SCHEMAS
from rwkvkit.plugins.samplers import GreedySampler
from test_cli_run import rwkvkit_run

PROMPTS = ["Once upon a time", "The capital of France is", "1 2 3", "\n"]


@pytest.fixture(scope="module")
def world_args(model_paths):
    return [f"model.path={model_paths['world']}", "model.tokenizer=rwkv_vocab_v20230424"]


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_each_prompt_equals_pipeline_generate_alone(tmp_path, world_args, model_paths):
    """Seeded nucleus sampling (the default config: ChatRWKV's PIPELINE_ARGS) with per-line seeds and
    token counts, a JSON-string line (the run's seed), a blank line, and a per-line greedy override;
    max_batch=2 makes prompts wait for a slot and join mid-run."""
    lines = [
        {"prompt": PROMPTS[0], "seed": 5},
        json.dumps(PROMPTS[1]),
        "",
        {"prompt": PROMPTS[2], "seed": 7, "token_count": 4},
        {"prompt": PROMPTS[3], "sampling": {"name": "greedy", "alpha_frequency": 0.0, "alpha_presence": 0.0}},
    ]
    out = tmp_path / "r"
    file = write_lines(tmp_path / "prompts.jsonl", lines)
    proc = rwkvkit_run(*world_args, f"prompts_file={file}", "token_count=9", "seed=3", "engine.max_batch=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = results(out)
    assert [(r["index"], r["line"], r["prompt"], r["seed"]) for r in got] == [(0, 1, PROMPTS[0], 5), (1, 2, PROMPTS[1], 3), (2, 4, PROMPTS[2], 7), (3, 5, PROMPTS[3], 3)]
    pipeline = PIPELINE(RWKV(model_paths["world"]), "rwkv_vocab_v20230424")
    args = PIPELINE_ARGS()
    expected = [
        pipeline.generate(PROMPTS[0], 9, args, seed=5, return_result=True),
        pipeline.generate(PROMPTS[1], 9, args, seed=3, return_result=True),
        pipeline.generate(PROMPTS[2], 4, args, seed=7, return_result=True),
        pipeline.generate(PROMPTS[3], 9, PIPELINE_ARGS(alpha_frequency=0, alpha_presence=0), sampler=GreedySampler(), seed=3, return_result=True),
    ]
    for r, want in zip(got, expected):
        assert (r["tokens"], r["text"], r["stop_reason"]) == (want.tokens, want.text, want.stop_reason)
        m = r["metrics"]
        assert m["generated_tokens"] == len(want.tokens) and m["prompt_tokens"] == len(pipeline.encode(r["prompt"]))
        assert m["time_to_first_token_s"] > 0 and m["decode_tok_per_s"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == 4 and metrics["generated_tokens"] == 9 + 9 + 4 + 9 and metrics["generated_tok_per_s"] > 0
    assert 0 < metrics["engine_peak_in_flight_mb"] <= metrics["engine_max_in_flight_mb"] == 2 * metrics["engine_sequence_mb"]
    assert metrics["engine_max_cache_mb"] == 0 and metrics["peak_memory_mb"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["prompts"] == 4 and run["stop_reasons"] == {"length": 4} and run["prompts_file"] == str(file)
    assert "4 prompts (4 length), 31 tokens" in proc.stderr


def test_greedy_batch_with_a_prompt_cache(tmp_path, world_args, model_paths):
    """A repeated prompt starts from the cache; every prompt still gets its greedy tokens alone."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    out = tmp_path / "r"
    file = write_lines(tmp_path / "p.jsonl", [json.dumps(p) for p in prompts])
    proc = rwkvkit_run(*world_args, f"prompts_file={file}", "sampling=greedy", "token_count=6", "engine.cache_mb=64", "engine.max_batch=1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pipeline = PIPELINE(RWKV(model_paths["world"]), "rwkv_vocab_v20230424")
    args = PIPELINE_ARGS(alpha_frequency=0, alpha_presence=0)
    assert [r["tokens"] for r in results(out)] == [pipeline.generate(p, 6, args, sampler="greedy", return_result=True).tokens for p in prompts]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["engine_peak_cache_mb"] <= metrics["engine_max_cache_mb"] == 64


def test_cache_prefix_shares_a_system_prompt(tmp_path, world_args, model_paths):
    """Prompts sharing a system prompt given as cache_prefix (the first stores its state, the
    others start from it) give the greedy tokens each gives alone, uncached."""
    system = "System: You are a helpful assistant who answers briefly.\n\n"
    prompts = [system + f"User: {q}\n\nAssistant:" for q in ("hi", "What is 2+2?", "Name a colour.")]
    out = tmp_path / "r"
    file = write_lines(tmp_path / "p.jsonl", [{"prompt": p, "cache_prefix": system} for p in prompts])
    proc = rwkvkit_run(*world_args, f"prompts_file={file}", "sampling=greedy", "token_count=5", "engine.cache_mb=64", "engine.max_batch=1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pipeline = PIPELINE(RWKV(model_paths["world"]), "rwkv_vocab_v20230424")
    args = PIPELINE_ARGS(alpha_frequency=0, alpha_presence=0)
    assert [r["tokens"] for r in results(out)] == [pipeline.generate(p, 5, args, sampler="greedy", return_result=True).tokens for p in prompts]
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "User: hello", "cache_prefix": "User: hel"}])
    proc = rwkvkit_run(*world_args, f"prompts_file={bad}", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path)
    assert proc.returncode == 2 and f"prompts_file={bad}, line 1: the prompt's tokens do not begin with those of its cache_prefix" in proc.stderr


def test_lines_with_constraints_equal_pipeline_generate_alone(tmp_path, world_args, model_paths):
    """Per-line json_schema (an object, and JSON text), regex and "constraint": null, and a line
    without the key, which gets the run's constraint.regex; each result is the one
    PIPELINE.generate gives for it alone, with its constraint."""
    date, digits = r"[0-9]{4}-[0-9]{2}-[0-9]{2}", "[0-9]{3}"
    constraints = [{"json_schema": SCHEMAS["flat"]}, {"json_schema": json.dumps(SCHEMAS["flat"])}, {"regex": date}, None, {"regex": digits}]
    lines = [{"prompt": "Here it is:", "seed": i, "constraint": c} for i, c in enumerate(constraints[:4])] + [{"prompt": "Here it is:", "seed": 4}]
    out = tmp_path / "r"
    file = write_lines(tmp_path / "p.jsonl", lines)
    proc = rwkvkit_run(*world_args, f"prompts_file={file}", "token_count=60", f"constraint.regex='{digits}'", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pipeline = PIPELINE(RWKV(model_paths["world"]), "rwkv_vocab_v20230424")
    got = results(out)
    for i, (r, c) in enumerate(zip(got, constraints)):
        want = pipeline.generate("Here it is:", 60, PIPELINE_ARGS(), seed=i, constraint=c, return_result=True)
        assert (r["tokens"], r["text"], r["stop_reason"]) == (want.tokens, want.text, want.stop_reason)
    assert [r["stop_reason"] for r in got] == ["constraint"] * 3 + ["length", "constraint"]
    jsonschema.validate(json.loads(got[0]["text"]), SCHEMAS["flat"])
    assert re.fullmatch(date, got[2]["text"]) and re.fullmatch(digits, got[4]["text"])


@pytest.mark.parametrize(
    "lines, args, message",
    [
        ([{"prompt": "a"}, {"prompt": "b", "constraint": {"regex": "[a-"}}], [], 'p.jsonl, line 2: "constraint": constraint regex: '),
        ([{"prompt": "a", "constraint": {"yaml_schema": "x"}}], [], "p.jsonl, line 1: \"constraint\": constraint kind 'yaml_schema' is unknown; available: "),
        ([{"prompt": "a", "constraint": {"json_schema": {"type": "objekt"}}}], [], 'p.jsonl, line 1: "constraint": constraint json_schema: Invalid type: objekt'),
        ([{"prompt": "a"}], ["constraint.json_schema=bad.json"], "constraint.json_schema=bad.json: constraint json_schema: Invalid type: objekt"),
    ],
)
def test_a_bad_constraint_fails_before_the_model_loads(tmp_path, lines, args, message):
    """The model file exists but is not a checkpoint: loading it would fail with another error."""
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    file = write_lines(tmp_path / "p.jsonl", lines)
    proc = rwkvkit_run(f"model.path={tmp_path / 'junk.pth'}", f"prompts_file={file}", *args, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "rwkvkit: error: " + (f"prompts_file={tmp_path}/" if message.startswith("p.jsonl") else "") + message in proc.stderr, proc.stderr  # a regex error spans lines


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "p.jsonl: no prompts in it; expected one JSON object per line"),
        (["", "  "], "p.jsonl: no prompts in it"),
        ([{"prompt": "a"}, "{nope"], "p.jsonl, line 2: not valid JSON (Expecting property name enclosed in double quotes"),
        ([{"seed": 1}], 'p.jsonl, line 1: no "prompt": expected {"prompt": "...", ...}'),
        ([{"prompt": ""}], 'p.jsonl, line 1: "prompt" must be a non-empty string, got ""'),
        ([{"prompt": 3}], 'p.jsonl, line 1: "prompt" must be a non-empty string, got 3'),
        (["[1, 2]"], 'p.jsonl, line 1: expected a JSON object {"prompt": ...} or a JSON string, got list [1, 2]'),
        ([{"prompt": "a", "seed": "x"}], 'p.jsonl, line 1: "seed" must be an integer, got "x"'),
        ([{"prompt": "a", "seed": True}], 'p.jsonl, line 1: "seed" must be an integer, got true'),
        ([{"prompt": "a", "token_count": -1}], 'p.jsonl, line 1: "token_count" must be an integer >= 0, got -1'),
        ([{"prompt": "a", "promt": "b"}], "p.jsonl, line 1: unknown key(s) ['promt']: expected prompt, seed, token_count, sampling, cache_prefix, constraint"),
        ([{"prompt": "ab", "cache_prefix": "b"}], 'p.jsonl, line 1: "cache_prefix" must be a non-empty string the prompt begins with, got "b"'),
        ([{"prompt": "a", "sampling": 1}], 'p.jsonl, line 1: "sampling" must be a JSON object of sampling options, got 1'),
        ([{"prompt": "a", "sampling": {"top_q": 1}}], "p.jsonl, line 1: \"sampling\": Key 'top_q' not in 'SamplingConfig'"),
        ([{"prompt": "a", "sampling": {"top_p": "x"}}], "p.jsonl, line 1: \"sampling\": Value 'x' of type 'str' could not be converted to Float"),
        ([{"prompt": "a"}, {"prompt": "b", "sampling": {"top_p": 2}}], "p.jsonl, line 2: sampling: sampling option top_p=2.0: expected a number in [0.0, 1.0]"),
        ([{"prompt": "a", "constraint": "[0-9]+"}], 'p.jsonl, line 1: "constraint" must be an object with one key, {"json_schema": ...}, {"regex": ...} or {"grammar": ...}, or null; got "[0-9]+"'),
        ([{"prompt": "a", "constraint": {"regex": "a", "grammar": "b"}}], 'p.jsonl, line 1: "constraint" must be an object with one key'),
        ([{"prompt": "a", "sampling": {"token_stop": [1.5]}}], "p.jsonl, line 1: sampling.token_stop has [1.5]"),
    ],
)
def test_bad_file_is_one_clear_line(tmp_path, lines, message):
    """Checked before the model loads (its path here does not exist: reaching the load would say so)."""
    file = write_lines(tmp_path / "p.jsonl", lines) if lines else tmp_path / "p.jsonl"
    if not lines:
        file.write_text("")
    proc = rwkvkit_run("model.path=/nonexistent/model.pth", f"prompts_file={file}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"rwkvkit: error: prompts_file={tmp_path}/{message}"), proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["prompts_file=/nonexistent/p.jsonl"], "prompts_file=/nonexistent/p.jsonl: cannot read it as UTF-8 text (FileNotFoundError"),
        (["prompts_file=/nonexistent/p.jsonl", "prompt=hi"], "prompt and prompts_file are both given: prompts_file=/nonexistent/p.jsonl holds every prompt"),
        (["prompts_file=/nonexistent/p.jsonl", "prompt_file=x.txt"], "prompt_file and prompts_file are both given"),
        (["prompts_file=/nonexistent/p.jsonl", "engine.max_batch=0"], "engine.max_batch=0: expected an integer >= 1"),
        (["prompts_file=/nonexistent/p.jsonl", "engine.cache_mb=-1"], "engine.cache_mb=-1: expected an integer >= 0"),
        (["prompts_file=/nonexistent/p.jsonl", "engine.prefill_budget=0"], "engine.prefill_budget=0: expected an integer >= 1, or None"),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    proc = rwkvkit_run("model.path=/nonexistent/model.pth", *args, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"rwkvkit: error: {message}"), proc.stderr


def test_undecodable_file(tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_bytes(b'{"prompt": "\xff"}\n')
    proc = rwkvkit_run("model.path=/nonexistent/model.pth", f"prompts_file={file}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2 and f"prompts_file={file}: cannot read it as UTF-8 text (UnicodeDecodeError" in proc.stderr
