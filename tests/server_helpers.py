"""A real ``rwkvkit serve`` subprocess on loopback for the server tests and the server benchmark."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

START_TIMEOUT_S = 120  # model load and imports on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(*overrides: str) -> Iterator[Server]:
    """``rwkvkit serve`` with ``overrides`` on a free loopback port, once it answers /health."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        with log.open("w") as out:
            cmd = [sys.executable, "-m", "rwkvkit", "serve", f"server.port={port}", "server.log_level=warning", *overrides]
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rwkvkit serve exited with {proc.returncode}:\n{server.output()}")
                try:
                    if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rwkvkit serve did not answer within {START_TIMEOUT_S} s:\n{server.output()}")
                time.sleep(0.2)
            yield server
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
