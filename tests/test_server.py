"""``rwkvkit serve`` (issue 17) as clients see it: a real server subprocess on loopback, driven by
the official ``openai`` client (and httpx for what the client hides: raw bodies, headers, SSE
disconnects). Greedy output equals ``PIPELINE.generate``'s; logprobs equal a plain forward's;
every error answer is checked on status and body; 32 concurrent streams complete, and a
cancellation storm leaves no active sequence behind."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import time

import httpx
import jsonschema
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from rwkvkit import PIPELINE, PIPELINE_ARGS, RWKV
from rwkvkit.server.template import ChatTemplate
from rwkvkit.state import State
from server_helpers import serving

MODEL = "demo"
LIMITS = ("server.max_tokens=2048", "server.max_prompt_tokens=512", "server.max_n=8", "server.max_logprobs=5")
PROMPT = "\nIn the beginning"
# logprobs: the server prefills in chunks and decodes in batches, the reference in one forward:
# float32 summation-order differences, ~1e-6 on logits of magnitude ~10
ATOL = 1e-4


def demo_time_states(seed: int) -> dict[str, torch.Tensor]:
    """A tuned initial state for the demo model (6 layers, 3 heads of 64), RWKV-PEFT's keys."""
    gen = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.att.time_state": torch.randn(3, 64, 64, generator=gen) * 0.5 for i in range(6)}


@pytest.fixture(scope="module")
def tuned_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("states") / "calm.pth"
    torch.save(demo_time_states(3), path)
    return path


@pytest.fixture(scope="module")
def server(tuned_path):
    with serving(*LIMITS, f"+server.states.calm={tuned_path}") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def pipeline():
    model = RWKV("pkg://rwkvkit.demo/demo.pth", "cpu fp32")  # the server's strategy, backend auto
    yield PIPELINE(model, "pkg://rwkvkit.demo/tokenizer.json")
    del model
    gc.collect()


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def error_of(response: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    return error


# --- completions ----------------------------------------------------------------------------


def test_models_lists_the_served_model(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["states"] == ["calm"]


def test_a_request_starts_from_a_named_tuned_state(server, client, pipeline, tuned_path):
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"state": "calm"})
    args = PIPELINE_ARGS(temperature=0)
    expected = pipeline.generate(PROMPT, token_count=12, args=args, state=State.from_tuned(tuned_path, pipeline.model))
    assert got.choices[0].text == expected != pipeline.generate(PROMPT, token_count=12, args=args)  # the state matters
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "state": "calm"})
    assert chat.status_code == 200, chat.text
    error_of(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "state": "wild"}), 400, "state", "'wild'", "calm")


def test_a_bad_configured_state_stops_the_server_before_it_serves(tmp_path):
    torch.save({k: v[:, :32] for k, v in demo_time_states(0).items()}, tmp_path / "small.pth")
    with pytest.raises(RuntimeError, match=r"server.states.small=.*small.pth: .*layer 0 state has shape \[3, 32, 64\]"):
        with serving(f"+server.states.small={tmp_path / 'small.pth'}"):
            pass


@pytest.mark.parametrize("presence, frequency", [(None, None), (0.5, 0.3)])
def test_greedy_completion_equals_pipeline_generate(client, pipeline, presence, frequency):
    """OpenAI's penalties are ChatRWKV's alpha_presence / alpha_frequency; left out, the server's
    sampling config (ChatRWKV's defaults, as PIPELINE_ARGS') applies."""
    extra = {} if presence is None else {"presence_penalty": presence, "frequency_penalty": frequency}
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, **extra)
    args = PIPELINE_ARGS(temperature=0) if presence is None else PIPELINE_ARGS(temperature=0, alpha_presence=presence, alpha_frequency=frequency)
    assert got.choices[0].text == pipeline.generate(PROMPT, token_count=24, args=args)
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 24 and got.usage.prompt_tokens == len(pipeline.encode(PROMPT))


def test_streaming_gives_the_same_text_as_one_answer(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, seed=11)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, seed=11, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30 and not chunks[-1].choices


def test_seed_reproduces_and_n_gives_distinct_choices(client):
    ask = dict(model=MODEL, prompt=[PROMPT, "\nAnd"], max_tokens=12, n=3, temperature=1.5, top_p=1.0)
    first, again = client.completions.create(seed=5, **ask), client.completions.create(seed=5, **ask)
    other = client.completions.create(seed=6, **ask)
    assert [c.index for c in first.choices] == list(range(6))
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert texts != [c.text for c in other.choices]
    assert len(set(texts[:3])) > 1  # choice j samples with seed + j
    assert first.usage.completion_tokens == 6 * 12


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_and_is_not_emitted(client, stream):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop = full[15:19]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=["never seen", stop], stream=stream)
    if stream:
        chunks = [c.choices[0] for c in got]
        text, finish = "".join(c.text for c in chunks), chunks[-1].finish_reason
    else:
        text, finish = got.choices[0].text, got.choices[0].finish_reason
    assert (text, finish) == (full[: full.index(stop)], "stop")


def test_logprobs_are_the_models_and_greedy_picks_the_top(client, pipeline):
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3).choices[0]
    lp = got.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert "".join(lp.tokens) == got.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(10)]
    ids = pipeline.encode(PROMPT) + pipeline.encode(got.text)
    logits, _ = pipeline.model.forward(ids, None, full_output=True)
    ref = torch.log_softmax(logits[len(pipeline.encode(PROMPT)) - 1 : -1], dim=-1)
    assert lp.token_logprobs == pytest.approx(ref.max(dim=-1).values.tolist(), abs=ATOL)
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=ATOL)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt(client, pipeline, stream):
    """What evaluation harnesses do: max_tokens=0, echo, logprobs."""
    text = "\nAnd God said, Let there be light"
    got = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, stream=stream)
    if stream:
        chunks = [c.choices[0] for c in got]
        body = "".join(c.text for c in chunks)
        lp = next(c.logprobs for c in chunks if c.logprobs is not None and c.logprobs.tokens)
    else:
        body, lp = got.choices[0].text, got.choices[0].logprobs
    ids = pipeline.encode(text)
    assert body == text and len(lp.tokens) == len(ids)
    logits, _ = pipeline.model.forward(ids, None, full_output=True)
    ref = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(ref.tolist(), abs=ATOL)


def test_token_id_prompts_and_rwkv_sampler_extensions(client, pipeline):
    ids = pipeline.encode(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    # a registered sampler by name with its options; top_k=1 is greedy whatever the temperature
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=8, extra_body={"sampler": "greedy", "sampler_options": {}}).choices[0].text == by_ids.choices[0].text
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=1.0, extra_body={"top_k": 1}).choices[0].text == by_ids.choices[0].text
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, seed=1, extra_body={"sampler": "min_p", "sampler_options": {"min_p": 0.2}, "alpha_decay": 0.9})
    assert got.usage.completion_tokens == 8


# --- chat -----------------------------------------------------------------------------------


MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Who made the heaven?"}]


def test_greedy_chat_is_the_world_template_continued_to_the_next_user_turn(client, pipeline):
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0)
    template = ChatTemplate()
    prompt = template.render([(m["role"], m["content"]) for m in MESSAGES])
    assert prompt == "System: You answer briefly.\n\nUser: Who made the heaven?\n\nAssistant:"
    expected = pipeline.generate(prompt, token_count=40, args=PIPELINE_ARGS(temperature=0, token_stop=["\n\nUser:"]), return_result=True)
    assert got.choices[0].message.content == expected.text.lstrip()
    assert got.choices[0].finish_reason == ("stop" if expected.stop_reason == "stop_string" else "length")
    assert got.choices[0].message.role == "assistant"


def test_chat_streams_the_same_reply_with_logprobs(client):
    ask = dict(model=MODEL, messages=MESSAGES, max_tokens=25, seed=3, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(stream=True, **ask))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]
    assert len(streamed) == whole.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in streamed)


# --- errors ---------------------------------------------------------------------------------


def post(server, path: str, body, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json", **(headers or {})}, timeout=60)


# --- structured output (response_format) ------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_response_format_json_schema_output_validates(client, seed):
    """Sampled (not greedy) completions and chat replies under a schema: each parses and
    validates, and finish_reason says whether the text was completed ("stop")."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=1.0, seed=seed, extra_body={"response_format": fmt})
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Who?"}], max_tokens=60, seed=seed, temperature=1.0, response_format=fmt
    )
    for text, reason in ((done.choices[0].text, done.choices[0].finish_reason), (chat.choices[0].message.content, chat.choices[0].finish_reason)):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_response_format_json_object_and_bad_formats(server, client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=80, seed=4, temperature=0.7, response_format={"type": "json_object"}
    )
    if reply.choices[0].finish_reason == "stop":  # a random walk may run out of tokens inside an object: then "length"
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    url = f"{server.url}/v1/completions"
    bad = [
        ({"type": "xml"}, "'xml'"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}, "response_format"),
        ({"type": "json_schema"}, "json_schema"),
    ]
    for fmt, word in bad:
        error_of(httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 4, "response_format": fmt}), 400, "response_format", word)



@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature", ["temperature", "number"]),
        ({"model": MODEL, "prompt": "x", "max_tokens": 1.5}, "max_tokens", ["max_tokens"]),
        ({"model": MODEL, "prompt": "x", "bogus": 1}, "bogus", ["bogus"]),
        ({"model": MODEL}, "prompt", ["prompt", "required"]),
        ({"model": MODEL, "prompt": "x", "stop": list("abcde")}, "stop", ["stop"]),
        ({"model": MODEL, "prompt": "x", "top_p": 2}, "top_p", ["top_p"]),
        ({"model": MODEL, "prompt": "x", "max_tokens": 4000}, "max_tokens", ["max_tokens=2048"]),
        ({"model": MODEL, "prompt": list(range(600))}, "prompt", ["max_prompt_tokens=512"]),
        ({"model": MODEL, "prompt": [10**6]}, "prompt", ["vocabulary"]),
        ({"model": MODEL, "prompt": "x", "n": 9}, "n", ["max_n=8"]),
        ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs", ["max_logprobs=5"]),
        ({"model": MODEL, "prompt": "x", "sampler": "nope"}, "sampler", ["nope"]),
        ({"model": MODEL, "prompt": "x", "sampler": "min_p", "sampler_options": {"min_p": 7}}, "sampler", ["min_p"]),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(server, body, param, words):
    error = error_of(post(server, "/v1/completions", body), 400, param, *words)
    assert error["type"] == "invalid_request_error"


def test_bad_chat_requests_and_malformed_json(server):
    error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400, "messages", "messages.0.role")
    error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")
    error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_logprobs": 2}), 400, "top_logprobs", "logprobs=true")
    error_of(post(server, "/v1/completions", '{"model": "demo", "prompt": '), 400, None, "not valid JSON")
    error_of(post(server, "/v1/completions", "[1, 2]"), 400, None)


def test_unknown_model_and_path_are_404(server):
    error = error_of(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model", "gpt-4", MODEL)
    assert error["code"] == "model_not_found"
    error_of(httpx.get(f"{server.url}/v1/engines"), 404, None, "/v1/engines")


# --- load, cancellation, metrics ------------------------------------------------------------


def test_32_concurrent_streams_then_a_cancellation_storm(server):
    async def stream_one(client: openai.AsyncOpenAI, seed: int) -> tuple[int, str | None]:
        chunks = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=64, seed=seed, stream=True, stream_options={"include_usage": True})
        usage, finish = None, None
        async for c in chunks:
            if c.choices and c.choices[0].finish_reason:
                finish = c.choices[0].finish_reason
            usage = c.usage or usage
        return usage.completion_tokens, finish

    async def drop_one(http: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data:")
                if seen == 3:
                    return  # the connection closes mid-stream

    async def main() -> tuple[list, None]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            done = await asyncio.gather(*(stream_one(client, seed) for seed in range(32)))
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            await asyncio.gather(*(drop_one(http) for _ in range(32)))
        return done

    before = metrics(server)["rwkvkit_generated_tokens_total"]
    done = asyncio.run(main())
    assert done == [(64, "length")] * 32
    deadline = time.monotonic() + 30  # each dropped stream's slot is freed at the engine's next step
    while (m := metrics(server))["rwkvkit_active_sequences"] or m["rwkvkit_queue_length"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["rwkvkit_generated_tokens_total"] - before < 32 * 64 + 32 * 200  # the dropped ones stopped early
    assert m["rwkvkit_time_to_first_token_seconds_count"] >= 64
    again = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4


def test_metrics_and_health(server, client):
    client.completions.create(model=MODEL, prompt="\nA shared prefix, asked twice", max_tokens=1)
    client.completions.create(model=MODEL, prompt="\nA shared prefix, asked twice", max_tokens=1)
    m = metrics(server)
    assert m["rwkvkit_prompt_cache_hits_total"] >= 1
    assert m["rwkvkit_prompt_tokens_total"] > 0 and m["rwkvkit_time_per_output_token_seconds_count"] > 0
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": MODEL}


# --- a second server: API keys, a full queue, graceful shutdown -------------------------------


def test_keys_full_queue_and_sigterm():
    key = "sk-test-123"
    with serving(f"server.api_keys=[{key}]", "server.max_batch=1", "server.max_queue=0", "server.grace_period=60") as s:
        auth = {"authorization": f"Bearer {key}"}
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": key}):
            for path in ("/v1/completions", "/v1/nowhere"):
                error = error_of(post(s, path, body, headers=headers), 401, None, "API key")
                assert error["code"] == "invalid_api_key" and "demo" not in json.dumps(error)
            error_of(httpx.get(f"{s.url}/v1/models", headers=headers), 401, None)
        assert httpx.get(f"{s.url}/health").status_code == 200  # liveness probes need no key
        assert post(s, "/v1/completions", body, headers=auth).status_code == 200

        with httpx.Client(base_url=s.url, headers=auth, timeout=120) as http:
            long = {**body, "max_tokens": 300, "stream": True}
            with http.stream("POST", "/v1/completions", json=long) as holder:  # takes the only slot
                lines = holder.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                busy = post(s, "/v1/completions", body, headers=auth)
                error = error_of(busy, 429, None, "busy")
                assert error["type"] == "rate_limit_error" and busy.headers["retry-after"] == "1"
                s.proc.send_signal(signal.SIGTERM)  # in-flight requests finish within the grace period
                rest = [json.loads(line[5:]) for line in lines if line.startswith("data:") and line != "data: [DONE]"]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(60) == 0, s.output()
        assert "server stopped" in s.output()
