"""The node's line to the control plane: join once over HTTP(S), then heartbeat on one
WebSocket (ws/wss) to it.

A node holds no Redis or database credentials: only the URL it joins, the one-time token
and, after joining, its own credential and ticket key.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import requests
from simple_websocket import Client, ConnectionClosed

from common.grant import Grant
from common.jsonobj import json_object

TIMEOUT_S = 5.0


class ControlError(Exception):
    """The control plane could not be reached or answered with a server error (retry)."""


class Refused(ControlError):
    """The control plane refused this node (bad token, revoked, forgotten): shut down."""


PACKAGE_TIMEOUT_S = 300.0   # a real model's weights are large


class ControlClient:
    """Keeps one HTTP connection alive (1,000 nodes' heartbeats stay cheap)."""

    def __init__(self, base_url: str, credential: str = "", verify: bool | str = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.credential = credential
        self.session = requests.Session()
        self.session.verify = verify
        self._ws: Client | None = None

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
        """One heartbeat on the node's heartbeat socket (opened on first use, reopened
        after a failure); its answer is the control plane's orders."""
        try:
            if self._ws is None:
                scheme, rest = self.base_url.split("://", 1)
                url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/api/nodes/beat"
                self._ws = Client.connect(url, headers={
                    "Authorization": f"Bearer {self.credential}"},
                    ssl_context=self._ssl_context())
            self._ws.send(json.dumps(report))
            raw = self._ws.receive(timeout=TIMEOUT_S)
        except ConnectionClosed as e:
            self._ws = None
            if e.reason in (4400, 4401):
                raise Refused(f"control plane refused the heartbeat ({e.reason}): "
                              f"{e.message}") from None
            raise ControlError(f"heartbeat socket closed ({e.reason} {e.message})") from None
        except (OSError, ValueError) as e:   # refused connection, bad handshake
            self._ws = None
            raise ControlError(f"control plane at {self.base_url} unreachable: {e}") from None
        if raw is None:
            self.close()
            raise ControlError(f"no answer to a heartbeat within {TIMEOUT_S:.0f} s")
        try:
            data = json_object(raw)
        except ValueError as e:
            self.close()
            raise ControlError(f"the control plane's answer to a heartbeat is {e}") from None
        if "error" in data:
            self.close()
            raise Refused(f"control plane refused the heartbeat: {data.get('message')}")
        return dict(data)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.base_url.startswith("https"):
            return None
        if isinstance(self.session.verify, str):
            return ssl.create_default_context(cafile=self.session.verify)
        return ssl.create_default_context()

    def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except (ConnectionClosed, OSError):
                pass

    def package(self, digest: str) -> bytes:
        """The model package this node was given, as stored (the caller checks the digest)."""
        try:
            resp = self.session.get(f"{self.base_url}/api/nodes/package/{digest}",
                                    headers={"Authorization": f"Bearer {self.credential}"},
                                    timeout=PACKAGE_TIMEOUT_S)
        except requests.RequestException as e:
            raise ControlError(f"control plane at {self.base_url} unreachable: {e}") from None
        if resp.status_code != 200:
            try:
                why = resp.json().get("message", resp.text[:200])
            except ValueError:
                why = resp.text[:200]
            raise ControlError(f"package {digest[:12]} refused ({resp.status_code}): {why}")
        return resp.content

    def leave(self) -> None:
        self.close()
        self._post("/api/nodes/leave", {})
