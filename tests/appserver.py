"""Start ``ferkit serve`` as a real server process on a free loopback port (for the app and browser tests
and the load benchmark)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*serve_args: str, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run ``python -m ferkit serve --host 127.0.0.1 --port <free> *serve_args``; yield its base URL once
    ``/healthz`` answers; stop it (SIGTERM, then SIGKILL) afterwards. The server's output goes to a
    temporary log file, shown if it fails to start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ferkit", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="ferkit-serve-") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"ferkit serve exited with {proc.returncode}:\n{Path(log.name).read_text()}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ferkit serve not up after {startup_timeout:g} s:\n{Path(log.name).read_text()}"
                    )
                time.sleep(0.25)
            yield url
            if proc.poll() is not None:
                raise RuntimeError(f"ferkit serve died with {proc.returncode}:\n{Path(log.name).read_text()}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
