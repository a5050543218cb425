"""``rwkvkit chat``: a terminal chat on the engine and the server's chat template.

Replies stream as they are generated; Ctrl-C stops the current reply (what it said so far is
kept) and not the chat. Each turn's prompt is the whole conversation, and the engine's prompt
cache holds the state after the previous turn's prompt, so a turn prefills only what is new.
Commands: /reset, /regen, /save FILE, /load FILE, /help, /quit (or Ctrl-D).
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
from rwkvkit.errors import RwkvkitError, Terminated, fail
from rwkvkit.interfaces import Callback
from rwkvkit.prompt_cache import PromptCache
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.run import check_model, load_model
from rwkvkit.server.template import ChatTemplate

FORMAT = "rwkvkit-chat/1"
HELP = """commands:
  /reset       forget the conversation (the system message stays)
  /regen       replace the last reply with a new one
  /save FILE   write the conversation to FILE (JSON; an existing file is not overwritten)
  /load FILE   continue a conversation saved by /save (with the same model)
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
        self.cfg, self.model, self.out = cfg, model, out
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
        data = {"format": FORMAT, "model_fingerprint": self.model.fingerprint, "messages": [list(m) for m in self.messages]}
        try:
            with path.open("x", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
        except FileExistsError:
            raise ChatError(f"/save {path}: the file exists; choose another name") from None
        except OSError as exc:
            raise ChatError(f"/save {path}: cannot write it ({exc.strerror or exc})") from None

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
        self.messages = [tuple(m) for m in messages]

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
