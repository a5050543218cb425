"""``rwkvkit chat``: a terminal chat on the engine and the server's chat template.

Replies stream as they are generated; Ctrl-C stops the current reply (what it said so far is
kept) and not the chat. Each turn's prompt is the whole conversation, and the engine's prompt
cache holds the state after the previous turn's prompt, so a turn prefills only what is new.
Commands: /reset, /regen, /save FILE, /load FILE, /help, /quit (or Ctrl-D).

``/save FILE`` writes the messages (JSON) and, beside them in ``FILE.state.safetensors``, the
model's state after the conversation (:meth:`State.save`, with the model's fingerprint); ``/load``
puts that state into the prompt cache, so the next reply prefills only the new turn. The state is
taken after the conversation's tokens but the last, which ``/load`` runs through the model for the
next-token scores a cache entry holds: one decode step, not a prefill.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import TextIO

from omegaconf import DictConfig

from rwkvkit.config import make_penalties, make_sampler, make_stops
from rwkvkit.engine import Engine, Request
from rwkvkit.errors import RwkvkitError, StateError, Terminated, fail
from rwkvkit.interfaces import Callback
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.run import check_model, load_model
from rwkvkit.server.template import ChatTemplate
from rwkvkit.state import State

FORMAT = "rwkvkit-chat/1"
STATE_SUFFIX = ".state.safetensors"  # the state file beside a saved chat
HELP = """commands:
  /reset       forget the conversation (the system message stays)
  /regen       replace the last reply with a new one
  /save FILE   write the conversation to FILE (JSON) and its model state to FILE.state.safetensors
               (an existing file is not overwritten)
  /load FILE   continue a conversation saved by /save (with the same model), without prefilling it again
  /help        this list
  /quit        leave (Ctrl-D too); Ctrl-C stops a reply, not the chat"""


class ChatError(RwkvkitError):
    """A chat command that cannot be done (a file to save or load); the chat goes on."""


class _Printer(Callback):
    """Writes a reply as it streams, without the space the model puts after ``Assistant:``."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.begun = out, False

    def on_text(self, piece: str) -> None:
        if not self.begun:
            piece = piece.lstrip()
            self.begun = bool(piece)
        self.out.write(piece)
        self.out.flush()


class Chat:
    """A conversation with one model: ``messages`` as (role, content) pairs."""

    def __init__(self, cfg: DictConfig, model, tokenizer, out: TextIO = sys.stdout) -> None:
        self.cfg, self.model, self.tokenizer, self.out = cfg, model, tokenizer, out
        self.template = ChatTemplate.of(cfg.model.chat)
        cache = PromptCache(cfg.prompt_cache_mb << 20) if cfg.prompt_cache_mb > 0 else None
        self.engine = Engine(model, tokenizer, max_batch=1, cache=cache)
        self.sampler = make_sampler(cfg.sampling)
        self.stops = [*make_stops(cfg.sampling), self.template.stop]
        self.seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**62)
        self.system = [("system", cfg.system)] if cfg.system else []
        self.messages: list[tuple[str, str]] = list(self.system)

    def say(self, text: str) -> None:
        self.messages.append(("user", text))
        self.reply()

    def reply(self) -> None:
        """Generate and print the assistant's next message; Ctrl-C ends it early (kept)."""
        self.out.write(f"{self.template.assistant}: ")
        request = Request(
            self.template.render(self.messages),
            self.cfg.max_tokens,
            self.sampler,
            make_penalties(self.cfg.sampling, self.model.spec.vocab_size),
            self.stops,
            seed=self.seed,
            callbacks=[_Printer(self.out)],
        )
        self.seed += 1
        handle = self.engine.submit(request)
        try:
            self.engine.run()
        except Terminated:
            raise
        except KeyboardInterrupt:  # the engine ended the reply (stop reason interrupted)
            self.out.write(" [stopped]")
        self.out.write("\n\n")
        if handle.error is not None and not isinstance(handle.error, KeyboardInterrupt):
            raise handle.error
        self.messages.append(("assistant", handle.result.text.strip()))

    def regenerate(self) -> None:
        if not self.messages or self.messages[-1][0] != "assistant":
            raise ChatError("/regen: there is no reply to regenerate yet")
        self.messages.pop()
        self.reply()

    def save(self, path: Path) -> None:
        """The messages to ``path`` and the state after them beside it; neither file may exist."""
        state_path = path.with_name(path.name + STATE_SUFFIX)
        for p in (path, state_path):
            if p.exists():
                raise ChatError(f"/save {path}: {p} exists; choose another name")
        ids = self.tokenizer.encode(self.template.history(self.messages))
        data = {"format": FORMAT, "model_fingerprint": self.model.fingerprint, "messages": [list(m) for m in self.messages]}
        try:
            if len(ids) > 1:
                self._state_before_last(ids).save(state_path)
                data["state"] = {"file": state_path.name, "tokens": ids}
            with path.open("x", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
        except (OSError, StateError) as exc:
            if "state" in data:
                state_path.unlink(missing_ok=True)
            detail = (exc.strerror or exc) if isinstance(exc, OSError) else exc
            raise ChatError(f"/save {path}: cannot write it ({detail})") from None

    def _state_before_last(self, ids: list[int]) -> State:
        """The state after ``ids[:-1]``: through the engine, so the prompt cache's state after the
        last reply's prompt is reused and only the reply is prefilled."""
        handle = self.engine.submit(Request(ids[:-1], 0, self.sampler))
        self.engine.run()
        if handle.error is not None:
            raise handle.error
        return handle.result.state

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ChatError(f"/load {path}: cannot read it as a saved chat ({exc.__class__.__name__}: {exc})") from None
        messages = data.get("messages") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(messages, list) or not all(
            isinstance(m, list) and len(m) == 2 and m[0] in ("system", "user", "assistant") and isinstance(m[1], str) for m in messages
        ):
            raise ChatError(f"/load {path}: not a chat saved by /save (expected format {FORMAT!r} with [role, text] messages)")
        if data.get("model_fingerprint") != self.model.fingerprint:
            raise ChatError(f"/load {path}: saved with another model (fingerprint {data.get('model_fingerprint')}, this one {self.model.fingerprint})")
        messages = [tuple(m) for m in messages]
        if "state" in data:
            self._load_state(path, data["state"], messages)
        self.messages = messages

    def _load_state(self, path: Path, saved: object, messages: list[tuple[str, str]]) -> None:
        """Put the saved state, and the state after the conversation's last token, in the prompt
        cache (without a cache, replies prefill the whole conversation anyway)."""
        ids = self.tokenizer.encode(self.template.history(messages))
        if not isinstance(saved, dict) or not isinstance(saved.get("file"), str) or saved.get("tokens") != ids:
            raise ChatError(f"/load {path}: its 'state' entry does not match its messages (expected the file name and the messages' token ids)")
        try:
            state = State.load(path.with_name(saved["file"]), self.model)
        except StateError as exc:
            raise ChatError(f"/load {path}: {exc}") from None
        if self.engine.cache is not None:
            logits, after = self.model.forward(ids[-1:], state)
            self.engine.cache.store(ids, after, logits)

    def command(self, line: str) -> bool:
        """Run a /command; False for /quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/quit":
            return False
        if name in ("/save", "/load") and not arg:
            raise ChatError(f"{name}: expected a file name after it")
        if name == "/reset":
            self.messages = list(self.system)
            self.out.write("(conversation reset)\n")
        elif name == "/regen":
            self.regenerate()
        elif name == "/save":
            self.save(Path(arg).expanduser())
            self.out.write(f"(saved to {arg})\n")
        elif name == "/load":
            self.load(Path(arg).expanduser())
            self.out.write(f"(loaded {len(self.messages)} messages from {arg})\n")
        elif name == "/help":
            self.out.write(HELP + "\n")
        else:
            raise ChatError(f"{name}: unknown command (/help lists them)")
        return True

    def loop(self, stdin: TextIO = sys.stdin) -> None:
        self.out.write(f"rwkvkit chat: {self.cfg.model.path}; /help lists the commands, Ctrl-D leaves\n\n")
        while True:
            self.out.write(f"{self.template.user}: ")
            self.out.flush()
            try:
                line = stdin.readline()
            except Terminated:
                raise
            except KeyboardInterrupt:
                self.out.write("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)\n")
                continue
            if not line:  # end of input
                self.out.write("\n")
                return
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.out.write("\n")
                    self.say(line)
            except ChatError as exc:
                self.out.write(f"rwkvkit: {exc}\n")


def chat_job(cfg: DictConfig) -> None:
    try:
        make_sampler(cfg.sampling)
        make_penalties(cfg.sampling)
        make_stops(cfg.sampling)
        if cfg.max_tokens < 1:
            raise ChatError(f"max_tokens={cfg.max_tokens}: expected an integer >= 1")
        model_path = check_model(cfg)
        tokenizer = resolve_tokenizer(cfg.model.tokenizer)
        Chat(cfg, load_model(cfg, model_path), tokenizer).loop()
    except RwkvkitError as exc:
        fail(exc)
