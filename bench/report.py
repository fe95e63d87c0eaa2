"""Print benchmark figures: an aligned table, then (with --json) one JSON object last."""

from __future__ import annotations

import json
from typing import Any


def report(figures: dict[str, Any], as_json: bool) -> None:
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if as_json:
        print(json.dumps(figures))
