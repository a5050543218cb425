"""Structured configs of ``rwkvkit serve`` and ``rwkvkit chat``: the ``model``, ``strategy`` and
``sampling`` groups of ``rwkvkit run`` (the sampling group gives the defaults that requests
override) plus a ``server`` group (conf/server/) or the chat's own keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore

from rwkvkit.config import ModelGroups, key, register_configs as register_run_configs
from rwkvkit.help import help_node

SERVE_ABOUT = """serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models),
with /health and Prometheus /metrics, on the batching engine. Loopback only unless server.host
says otherwise; API keys with server.api_keys or server.api_key_file."""
CHAT_ABOUT = """chat with a model in the terminal (/help lists the commands; Ctrl-C stops a reply,
Ctrl-D leaves). The chat format is the model config's chat keys."""


@dataclass
class ServerConfig:
    host: str = key("127.0.0.1", "address to bind: loopback unless asked (0.0.0.0 serves every interface; set api_keys then)")
    port: int = key(8000, "TCP port (0: any free port, printed at start-up)")
    model_name: Optional[str] = key(None, "the model id clients send; null: the checkpoint's file name without its suffix")
    max_batch: int = key(32, "sequences generated at once (the engine's batch); the rest wait in the queue")
    max_queue: int = key(256, "sequences waiting for a slot; a request that would exceed it gets 429 with Retry-After")
    retry_after: int = key(1, "seconds a 429 answer tells the client to wait (Retry-After)")
    max_prompt_tokens: int = key(16384, "longest prompt accepted, in tokens (longer: 400)")
    max_tokens: int = key(4096, "most tokens one choice may generate: a larger max_tokens is refused (400); chat's default")
    default_max_tokens: int = key(16, "completions' max_tokens when a request gives none (OpenAI's default)")
    max_n: int = key(16, "most choices (n x prompts) one request may ask for")
    max_logprobs: int = key(20, "most alternatives logprobs / top_logprobs may ask for")
    request_timeout: float = key(600.0, "seconds a request may take; then it is cancelled (504, or an error event when streaming)")
    prefill_tokens_per_step: int = key(512, "prompt tokens one engine step prefills: bounds how long a long prompt delays others' tokens")
    prompt_cache_mb: int = key(512, "memory for cached prompt states (shared prefixes, chat histories); 0 disables the cache")
    api_keys: List[str] = key(meaning="accepted 'Authorization: Bearer' keys; empty: no authentication", factory=list)
    api_key_file: Optional[str] = key(None, "a file of accepted keys, one per line (keeps keys off the command line)")
    grace_period: float = key(10.0, "seconds in-flight requests may finish after SIGTERM/Ctrl-C before they are cancelled")
    log_level: str = key("info", "uvicorn's log level: critical, error, warning, info, debug")
    states: Dict[str, str] = key(meaning="tuned initial states requests may start from: name -> state-tuning file (RWKV-PEFT time_state); add one with +server.states.NAME=PATH; a request picks it with \"state\": NAME", factory=dict)


@dataclass
class ServeConfig(ModelGroups):
    server: ServerConfig = key(factory=ServerConfig)


@dataclass
class ChatConfig(ModelGroups):
    system: str = key("", "a system message opening the conversation (empty: none)")
    max_tokens: int = key(500, "most tokens of one reply")
    seed: Optional[int] = key(None, "sampling seed of the first reply (each later reply takes the next); null: random")
    prompt_cache_mb: int = key(256, "memory for the conversation's cached states (each turn prefills only what is new)")


def register_configs() -> None:
    """The run configs (:func:`rwkvkit.config.register_configs`) and the serve and chat schemas
    with their help pages, in Hydra's ConfigStore."""
    register_run_configs()
    cs = ConfigStore.instance()
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="chat_schema", node=ChatConfig)
    cs.store(group="hydra/help", name="rwkvkit_serve", node=help_node(ServeConfig, "rwkvkit serve", SERVE_ABOUT))
    cs.store(group="hydra/help", name="rwkvkit_chat", node=help_node(ChatConfig, "rwkvkit chat", CHAT_ABOUT))
