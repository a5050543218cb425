"""``rwkvkit serve``: the Hydra task that loads the configured model and serves it with uvicorn.

SIGTERM and Ctrl-C stop it gracefully: uvicorn stops accepting connections, in-flight requests
get ``server.grace_period`` seconds to finish, then what is left is cancelled; the command then
exits 0 (a second Ctrl-C stops at once)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from pathlib import Path

from omegaconf import DictConfig

from rwkvkit.config import make_penalties, make_sampler, make_stops
from rwkvkit.errors import RwkvkitError, fail
from rwkvkit.resolve import resolve_tokenizer
from rwkvkit.run import check_model, load_model

log = logging.getLogger(__name__)
SHUTDOWN_MARGIN_S = 2  # uvicorn's wait beyond the streams' grace period, for their last events
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class ServeError(RwkvkitError):
    """The ``server`` config cannot be served (a bad port, address, key file...)."""


def api_keys(server: DictConfig) -> list[str]:
    keys = list(server.api_keys)
    if server.api_key_file is not None:
        path = Path(server.api_key_file).expanduser()
        try:
            keys += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"server.api_key_file={server.api_key_file}: cannot read it ({exc.__class__.__name__}: {exc})") from None
        if not keys:
            raise ServeError(f"server.api_key_file={server.api_key_file}: holds no key (one per line expected)")
    if any(not isinstance(k, str) or not k.strip() or any(c.isspace() for c in k) for k in keys):
        raise ServeError("server.api_keys: every key must be a non-empty string without spaces")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server(server: DictConfig) -> None:
    """Everything in ``server`` that can be wrong, before the model loads."""
    if not 0 <= server.port <= 65535:
        raise ServeError(f"server.port={server.port}: expected 0..65535")
    positive = ("max_batch", "max_prompt_tokens", "max_tokens", "max_n", "prefill_tokens_per_step", "retry_after")
    for name in positive:
        if server[name] < 1:
            raise ServeError(f"server.{name}={server[name]}: expected an integer >= 1")
    for name in ("max_queue", "default_max_tokens", "max_logprobs", "prompt_cache_mb"):
        if server[name] < 0:
            raise ServeError(f"server.{name}={server[name]}: expected an integer >= 0")
    if server.default_max_tokens > server.max_tokens:
        raise ServeError(f"server.default_max_tokens={server.default_max_tokens} exceeds server.max_tokens={server.max_tokens}")
    for name in ("request_timeout", "grace_period"):
        if not server[name] > 0:
            raise ServeError(f"server.{name}={server[name]}: expected a positive number of seconds")
    if server.log_level not in LOG_LEVELS:
        raise ServeError(f"server.log_level={server.log_level}: expected one of {', '.join(LOG_LEVELS)}")
    try:
        socket.getaddrinfo(server.host, None)
    except OSError as exc:
        raise ServeError(f"server.host={server.host}: not an address of this machine ({exc})") from None


def serve_job(cfg: DictConfig) -> None:
    try:
        _serve(cfg)
    except RwkvkitError as exc:
        fail(exc)


def _serve(cfg: DictConfig) -> None:
    try:
        import uvicorn

        from rwkvkit.server.app import Gate, create_app
        from rwkvkit.server.service import Service
    except ImportError as exc:
        raise ServeError(f"rwkvkit serve needs the serve extra: pip install 'rwkvkit[serve]' ({exc})") from None
    server = cfg.server
    check_server(server)
    keys = api_keys(server)
    make_sampler(cfg.sampling)
    make_penalties(cfg.sampling)
    make_stops(cfg.sampling)
    model_path = check_model(cfg)
    tokenizer = resolve_tokenizer(cfg.model.tokenizer)
    model = load_model(cfg, model_path)
    name = server.model_name or Path(str(model.checkpoint_path)).stem
    service = Service(model, tokenizer, cfg, name)
    app = Gate(create_app(service, server.grace_period), keys, service)
    if not is_loopback(server.host) and not keys:
        print(f"rwkvkit: warning: serving on {server.host} without API keys: anyone who can reach this port can use the model", file=sys.stderr)
    print(f"rwkvkit: serving {name} at http://{server.host}:{server.port}/v1 (OpenAI API); Ctrl-C stops", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=server.host, port=server.port, log_level=server.log_level, timeout_graceful_shutdown=server.grace_period + SHUTDOWN_MARGIN_S)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal that stopped it, once it has shut down
        pass
    print("rwkvkit: server stopped", file=sys.stderr)
