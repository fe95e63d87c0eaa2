"""One JSON object off the wire: what a client's message and a node's report must be."""

from __future__ import annotations

import json
from typing import Any


def json_object(raw: str | bytes) -> dict[str, Any]:
    """`raw` as one JSON object, or ValueError saying what it is instead (callers raise
    their own error with it)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:   # RecursionError: nested past the decoder
        raise ValueError(f"not JSON ({str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not a JSON object")
    return data
