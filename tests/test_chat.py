"""``rwkvkit chat`` (issue 17): the conversation through the engine and the World template,
/regen, /reset, /save and /load (never overwriting, refusing another model's file; the saved state
lets a loaded chat go on without prefilling the conversation again), the prompt
cache reused across turns, and, in a real terminal-less subprocess, Ctrl-C stopping a reply but
not the chat."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from rwkvkit.chat import Chat, ChatError
from rwkvkit.config import ModelConfig
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.run import load_model
from rwkvkit.server.config import ChatConfig
from rwkvkit.state import State

DEMO = ModelConfig(path="pkg://rwkvkit.demo/demo.pth", tokenizer="pkg://rwkvkit.demo/tokenizer.json")


@pytest.fixture(scope="module")
def loaded():
    cfg = OmegaConf.structured(ChatConfig(model=DEMO, max_tokens=12, seed=7, system="Be brief."))
    return cfg, load_model(cfg, "pkg://rwkvkit.demo/demo.pth"), resolve_tokenizer(DEMO.tokenizer)


def new_chat(loaded) -> tuple[Chat, io.StringIO]:
    cfg, model, tokenizer = loaded
    out = io.StringIO()
    return Chat(cfg, model, tokenizer, out), out


def test_turns_regen_reset_and_the_cache(loaded):
    chat, out = new_chat(loaded)
    chat.say("Who made the heaven?")
    assert [r for r, _ in chat.messages] == ["system", "user", "assistant"]
    reply = chat.messages[-1][1]
    assert f"Assistant: {reply}" in out.getvalue()
    chat.say("And then?")  # its prompt starts with the last one: prefilled from the cache
    assert chat.engine.cache.stats().hits >= 1 and len(chat.messages) == 5
    chat.regenerate()
    assert len(chat.messages) == 5 and chat.messages[-1][0] == "assistant"
    chat.command("/reset")
    assert chat.messages == [("system", "Be brief.")]
    with pytest.raises(ChatError, match="no reply"):
        chat.regenerate()


def test_save_and_load_the_conversation(loaded, tmp_path):
    chat, _ = new_chat(loaded)
    chat.say("Hello")
    saved = list(chat.messages)
    path = tmp_path / "talk.json"
    chat.command(f"/save {path}")
    before = path.read_bytes()
    with pytest.raises(ChatError, match="exists"):
        chat.command(f"/save {path}")
    assert path.read_bytes() == before  # nothing a user has is overwritten
    chat.command("/reset")
    chat.command(f"/load {path}")
    assert chat.messages == saved

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(before), "model_fingerprint": "0" * 32}))
    with pytest.raises(ChatError, match="another model"):
        chat.load(other)
    other.write_text("not json")
    with pytest.raises(ChatError, match="cannot read it"):
        chat.load(other)
    other.write_text(json.dumps({"format": "rwkvkit-chat/1", "messages": [["robot", "x"]]}))
    with pytest.raises(ChatError, match="not a chat saved"):
        chat.load(other)
    with pytest.raises(ChatError, match="unknown command"):
        chat.command("/bogus")
    assert chat.messages == saved  # refused loads leave the conversation as it was


def forwarded_tokens(monkeypatch, model) -> list[int]:
    """Counts the tokens each ``model.forward`` call runs from now on."""
    counts, forward = [], model.forward

    def counted(tokens, state, full_output=False):
        counts.append(torch.as_tensor(tokens).numel())
        return forward(tokens, state, full_output)

    monkeypatch.setattr(model, "forward", counted)
    return counts


def test_save_keeps_the_state_and_load_continues_without_prefilling_again(loaded, tmp_path, monkeypatch):
    cfg, model, tok = loaded
    chat, _ = new_chat(loaded)
    chat.say("Who made the heaven?")
    path = tmp_path / "talk.json"
    chat.command(f"/save {path}")
    data = json.loads(path.read_text())
    ids = tok.encode(chat.template.history(chat.messages))
    assert data["state"] == {"file": "talk.json.state.safetensors", "tokens": ids}
    # the state after all but the last token: as a plain prefill gives it (summation-order
    # differences of other chunkings only, ~1e-6 of values of size ~1; 1e-4 is far above them)
    saved = State.load(tmp_path / "talk.json.state.safetensors", model)
    _, want = model.forward(ids[:-1], None)
    for a, b in zip(saved.layers, want.layers):
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.allclose(x, y, rtol=0, atol=1e-4 * float(y.abs().max()))

    chat.say("And then?")  # the conversation going on in the chat that saved it
    fresh, _ = new_chat(loaded)
    fresh.seed = chat.seed - 1  # the seed the second reply took
    fresh.command(f"/load {path}")
    counts = forwarded_tokens(monkeypatch, model)
    fresh.say("And then?")
    monkeypatch.undo()
    prompt = tok.encode(fresh.template.render(fresh.messages[:-1]))
    assert counts[0] == len(prompt) - len(ids)  # only the new turn is prefilled
    assert fresh.messages == chat.messages


def test_save_never_overwrites_and_load_refuses_a_state_that_does_not_fit(loaded, tmp_path):
    cfg, model, tok = loaded
    chat, _ = new_chat(loaded)
    chat.say("Hello")
    taken = tmp_path / "b.json.state.safetensors"
    taken.write_bytes(b"mine")
    with pytest.raises(ChatError, match="b.json.state.safetensors exists"):
        chat.command(f"/save {tmp_path / 'b.json'}")
    assert taken.read_bytes() == b"mine" and not (tmp_path / "b.json").exists()

    path = tmp_path / "a.json"
    chat.command(f"/save {path}")
    saved = list(chat.messages)
    state_file = tmp_path / "a.json.state.safetensors"
    good = State.load(state_file, model)
    fresh, _ = new_chat(loaded)
    State(good.layers, "0" * 32).save(tmp_path / "other.state.safetensors")  # another model's state
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "state": {**data["state"], "file": "other.state.safetensors"}}))
    with pytest.raises(ChatError, match="belongs to another model"):
        fresh.load(path)
    path.write_text(json.dumps({**data, "state": {**data["state"], "tokens": data["state"]["tokens"][:-1]}}))
    with pytest.raises(ChatError, match="does not match its messages"):
        fresh.load(path)
    state_file.unlink()
    path.write_text(json.dumps(data))
    with pytest.raises(ChatError, match="state file not found"):
        fresh.load(path)
    assert fresh.messages == [("system", "Be brief.")]  # refused loads leave the conversation as it was
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "state"}))  # a chat saved before states were
    fresh.load(path)
    assert fresh.messages == saved


def read_until(proc: subprocess.Popen, marker: str, seen: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        if select.select([proc.stdout], [], [], 0.5)[0]:
            data = os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
            assert data, f"chat exited: {seen!r}"
            seen += data
    return seen


def test_ctrl_c_stops_the_reply_not_the_chat():
    # a user name the model never writes: the reply runs until Ctrl-C (or max_tokens)
    cmd = [sys.executable, "-m", "rwkvkit", "chat", "max_tokens=5000", "model.chat.user=Qzxv", "seed=1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = read_until(proc, "Qzxv: ", "")
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        seen = read_until(proc, "Assistant: ", seen)
        start = len(seen)
        while len(seen) < start + 20:  # some of the reply has streamed
            seen += os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        seen = read_until(proc, "[stopped]", seen)
        seen = read_until(proc, "Qzxv: ", seen[seen.index("[stopped]") :])
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
