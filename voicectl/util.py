"""What voicectl's commands share: where the stack is, and how a table prints."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import VoiceError
from voicectl import procs


def say(msg: str) -> None:
    print(f"voicectl: {msg}", flush=True)


RUN_FILE = procs.ROOT / "var" / "run.json"
USER_SECRET_FILE = procs.ROOT / "var" / "user-token-secret"
FLOWER_SECRET_FILE = procs.ROOT / "var" / "flower-password"   # Flower's, user "voice"


def local_user_secret(path: Path = USER_SECRET_FILE) -> str:
    """The local stack's USER_TOKEN_SECRET, made once and kept in `path` (mode 0600, its
    folder 0700): page cookies outlive a restart, and `voicectl user-token` in another
    terminal mints tokens the running stack accepts."""
    return procs.secret_file(path)


def with_user_secret(cfg: Config) -> Config:
    """USER_TOKEN_SECRET from the environment, else the local stack's own."""
    if os.environ.get("USER_TOKEN_SECRET"):
        return cfg
    return cfg.with_overrides(user_token_secret=local_user_secret())


def redis_url(cfg: Config) -> str:
    if cfg.redis_url:
        return cfg.redis_url
    if RUN_FILE.exists():
        return str(json.loads(RUN_FILE.read_text())["redis_url"])
    raise VoiceError("no REDIS_URL and no running `voicectl run` (var/run.json); start the "
                     "stack or set REDIS_URL")


def default_url() -> str:
    if RUN_FILE.exists():
        return str(json.loads(RUN_FILE.read_text())["url"])
    return "http://127.0.0.1:8000"


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except (urllib.error.URLError, OSError) as e:
        raise VoiceError(f"cannot reach the webapp at {url} ({e}); is `voicectl run` "
                         "running? pass --url if it listens elsewhere") from None


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
