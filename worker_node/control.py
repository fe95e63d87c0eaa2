"""The node's line to the control plane: join once, then heartbeat, over HTTP(S).

A node holds no Redis or database credentials: only the URL it joins, the one-time token
and, after joining, its own credential and ticket key.
"""

from __future__ import annotations

from typing import Any

import requests

from common.grant import Grant

TIMEOUT_S = 5.0


class ControlError(Exception):
    """The control plane could not be reached or answered with a server error (retry)."""


class Refused(ControlError):
    """The control plane refused this node (bad token, revoked, forgotten): shut down."""


class ControlClient:
    """Keeps one HTTP connection alive (1,000 nodes' heartbeats stay cheap)."""

    def __init__(self, base_url: str, credential: str = "", verify: bool | str = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.credential = credential
        self.session = requests.Session()
        self.session.verify = verify

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.credential}"} if self.credential else {}
        try:
            resp = self.session.post(self.base_url + path, json=body, headers=headers,
                                     timeout=TIMEOUT_S)
        except requests.RequestException as e:
            raise ControlError(f"control plane at {self.base_url} unreachable: {e}") from None
        try:
            data = resp.json()
        except ValueError:
            data = {"message": resp.text[:200]}
        if resp.status_code in (400, 401, 403, 404, 410):
            raise Refused(f"control plane refused {path} ({resp.status_code}): "
                          f"{data.get('message', data)}")
        if resp.status_code >= 300:
            raise ControlError(f"control plane answered {resp.status_code} to {path}: "
                               f"{data.get('message', data)}")
        return dict(data)

    def join(self, token: str, url: str) -> Grant:
        data = self._post("/api/nodes/join", {"token": token, "url": url})
        grant = Grant.from_json(data)
        self.credential = grant.credential
        return grant

    def beat(self, report: dict[str, Any]) -> dict[str, Any]:
        return self._post("/api/nodes/heartbeat", report)

    def leave(self) -> None:
        self._post("/api/nodes/leave", {})
