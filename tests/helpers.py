"""Stack helpers the tests share (re-exported by conftest): the webapp as `voicectl run`
serves it, sessions placed as the lobby places them, a model's next version, and what a
lobby that went silent reports (the live state, every thread's stack)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis

from common.config import Config
from common.package import pack
from provisioner import catalog, versions
from provisioner.state import State
from provisioner.versions import Version
from voicectl import procs

ROOT = Path(__file__).resolve().parent.parent
RUNNING: list[State] = []   # the live state of each running control plane (live_state)


def local_webapp(cfg: Config, tmp: Path, **settings: object) -> tuple[int, Any]:
    """The webapp as `voicectl run` serves it, a gunicorn gevent worker (webapp.wsgi:local),
    on our Redis and database, with [settings] overrides; (port, process), once it serves."""
    text = (ROOT / "common" / "default.toml").read_text()
    for key, value in settings.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
        text = text if n else text.replace("[settings]\n", f"[settings]\n{key} = "
                                           f"{json.dumps(value)}\n")
    (tmp / "voice.toml").write_text(text)
    port = procs.free_port()
    env = {"PATH": os.environ["PATH"], "REDIS_URL": cfg.redis_url or "",
           "DATABASE_URL": cfg.database_url, "TICKET_SECRET": cfg.ticket_secret,
           "USER_TOKEN_SECRET": cfg.user_token_secret, "VOICE_DEV_USERS": "1",
           "MODEL_LOAD_SECONDS": str(cfg.model_load_s), "VOICE_CONFIG": str(tmp / "voice.toml"),
           "VOICE_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    proc = procs.spawn(procs.webapp_command("127.0.0.1", port), env=env,
                       log=tmp / "webapp.log")
    deadline = time.monotonic() + 60
    while True:   # until its worker built the app (and seeded the models)
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp / "webapp.log").read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return port, proc
        except OSError:
            time.sleep(0.1)


def place(state: State, node_id: str, user: str, session: str, fence: int) -> None:
    """Record a session as placed on a node, as the lobby does when it signs its ticket."""
    state.save_session(session, {"user": user, "model": "miku", "version": "1",
                                 "region": "us-west", "node": node_id, "fence": fence,
                                 "created_at": time.time()}, ttl_s=3600)


def push_version(state: State, cfg: Config, model: str, drain_s: float = 600.0,
                 canary: int | None = None, package: Path | None = None,
                 **params: Any) -> Version:
    """The next version of a configured model: its package with `params` changed (a new
    digest either way), stored and registered as `voicectl models push` does, without the
    check's child process (tests/test_models.py pushes through the real command)."""
    base = package or cfg.model(model).package   # type: ignore[union-attr]
    tmp = Path(tempfile.mkdtemp(prefix="pkg-"))
    shutil.copytree(base, tmp / "p", ignore=shutil.ignore_patterns("__pycache__"))
    toml = (tmp / "p" / "model.toml").read_text()
    for k, v in params.items():   # [params] is the last table of the shipped packages
        line = f"{k} = {json.dumps(v)}"
        toml, n = re.subn(rf"^{k} = .*$", line, toml, flags=re.M)
        toml += "" if n else line + "\n"
    (tmp / "p" / "model.toml").write_text(toml.replace('description = "', f'description = "'
                                                         f'{uuid.uuid4().hex[:6]} ', 1))
    manifest, data, digest = pack(tmp / "p")
    catalog.store(cfg).put(digest, data)
    out: list[Version] = []

    def change(e: Any) -> Any:
        entry, v = versions.push(e, manifest.name, digest, manifest.streams_per_gpu,
                                 manifest.description, time.time(), drain_s, canary)
        out.append(v)
        return entry
    state.change_model(manifest.name, change)
    state.wake_lobbies()
    return out[-1]


def live_state() -> str:
    """The running control planes' nodes, slots and queues: why a lobby got no node."""
    from provisioner.state.keys import NODES, QUEUES, node_key, queue_key, slots_key

    out = []
    for state in RUNNING:
        try:
            for node_id in sorted(state.r.smembers(NODES)):
                out.append(f"node {node_id}: {state.r.hgetall(node_key(node_id))} slots "
                           f"{state.r.zrange(slots_key(node_id), 0, -1, withscores=True)}")
            out += [f"queue {pool}: {state.r.zrange(queue_key(pool), 0, -1, withscores=True)}"
                    for pool in sorted(state.r.smembers(QUEUES))]
        except redis.RedisError as e:
            out.append(f"unreadable: {e}")
    return f"--- live state at {time.time():.3f}:\n" + "\n".join(out) + "\n"


def thread_stacks() -> str:
    """Where every thread of this process is (an in-process webapp's lobbies and waiting
    room among them): what a lobby that went silent was waiting for."""
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    seen: dict[str, list[str]] = {}   # a stack -> the threads there (old apps' rooms idle)
    for ident, frame in sys._current_frames().items():
        seen.setdefault("".join(traceback.format_stack(frame)[-25:]), []).append(
            str(names.get(ident, ident)))
    return "\n".join(f"--- threads {', '.join(who)}:\n{stack}" for stack, who in seen.items())
