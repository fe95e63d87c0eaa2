"""The node's line to the control plane over HTTP(S): join once, then heartbeat on one
kept-alive connection (POST /api/nodes/heartbeat); fetch its model package by digest.

A node holds no Redis or database credentials: only the URL it joins, the one-time token
and, after joining, its own credential and ticket key.
"""

from __future__ import annotations

from typing import Any

import requests

from common.errors import VoiceError
from common.grant import Grant

TIMEOUT_S = 5.0
PACKAGE_TIMEOUT_S = 300.0   # a real model's weights are large


class ControlError(VoiceError):
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

    def _send(self, method: str, path: str, timeout_s: float, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.credential}"} if self.credential else {}
        try:
            return self.session.request(method, self.base_url + path, headers=headers,
                                        timeout=timeout_s, **kw)
        except requests.RequestException as e:
            raise ControlError(f"control plane at {self.base_url} unreachable: {e}") from None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._send("POST", path, TIMEOUT_S, json=body)
        try:
            data = resp.json()
        except ValueError:
            data = {"message": resp.text[:200]}
        why = data.get("message", data)
        if resp.status_code in (401, 403, 404, 410):   # not (or no longer) one of its nodes
            raise Refused(f"control plane refused {path} ({resp.status_code}): {why}")
        if resp.status_code == 400:   # this report is refused, not the node: say so, go on
            raise ControlError(f"control plane refused this report to {path}: {why}")
        if resp.status_code >= 300:
            raise ControlError(f"control plane answered {resp.status_code} to {path}: {why}")
        return dict(data)

    def join(self, token: str, url: str) -> Grant:
        grant = Grant.from_json(self._post("/api/nodes/join", {"token": token, "url": url}))
        self.credential = grant.credential
        return grant

    def beat(self, report: dict[str, Any]) -> dict[str, Any]:
        """One heartbeat; its answer is the control plane's orders."""
        return self._post("/api/nodes/heartbeat", report)

    def package(self, digest: str) -> bytes:
        """The model package this node was given, as stored (the caller checks the digest)."""
        resp = self._send("GET", f"/api/nodes/package/{digest}", PACKAGE_TIMEOUT_S)
        if resp.status_code != 200:
            try:
                why = resp.json().get("message", resp.text[:200])
            except ValueError:
                why = resp.text[:200]
            raise ControlError(f"package {digest[:12]} refused ({resp.status_code}): {why}")
        return resp.content

    def leave(self) -> None:
        self._post("/api/nodes/leave", {})
