"""What voicectl's commands share: where the stack is, and how a table prints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from common.config import Config
from common.errors import VoiceError
from voicectl.run import RUN_FILE


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
