"""The dev cloud's instance metadata service: what a VM asks 169.254.169.254, on loopback.

EC2's IMDSv2 (a token from PUT /latest/api/token, then GETs with it; a GET without a valid
token is refused, as on an instance that requires IMDSv2) for every "VM" of this machine:
its address, and per instance its spot interruption notice. `CloudInit` gives each
instance the base URL `URL/INSTANCE_ID`, so the service knows who asks.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from voicectl import procs

__all__ = ["POLL_SHUTDOWN_S", "Metadata", "iso_utc"]

POLL_SHUTDOWN_S = 0.05   # how soon close() returns (serve_forever's own default: 0.5 s)
_PATH = re.compile(r"^(?:/(i-[0-9a-zA-Z]+))?(/latest/.*)$")


def iso_utc(at: float) -> str:
    """EC2's spelling of a time: 2026-12-07T14:02:00Z."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Metadata:
    """EC2's instance metadata on loopback: `public_ip` for `meta-data/public-ipv4` and
    `local-ipv4` (what `voicectl node --public-url auto` asks), and per instance
    `meta-data/spot/instance-action`: 404 until `notices[instance_id]` holds the unix time
    its provider takes it back, then {"action": "terminate", "time": ISO}. `asked` counts
    address lookups, `polled` notice polls per instance."""

    def __init__(self, public_ip: str = "127.0.0.1") -> None:
        self.public_ip = public_ip
        self.asked = 0
        self.notices: dict[str, float] = {}
        self.polled: dict[str, int] = {}
        token = base64.urlsafe_b64encode(os.urandom(18)).decode()
        meta = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                m = _PATH.match(self.path)
                ok = m is not None and m.group(2) == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200 if ok else 400, token if ok else "bad token request")

            def do_GET(self) -> None:
                m = _PATH.match(self.path)
                instance, path = (m.group(1) or "", m.group(2)) if m else ("", "")
                if self.headers.get("X-aws-ec2-metadata-token") != token:
                    self._send(401, "")
                elif path in ("/latest/meta-data/public-ipv4", "/latest/meta-data/local-ipv4"):
                    meta.asked += 1
                    self._send(200, meta.public_ip)
                elif path == "/latest/meta-data/spot/instance-action":
                    meta.polled[instance] = meta.polled.get(instance, 0) + 1
                    at = meta.notices.get(instance)
                    self._send(404, "") if at is None else self._send(200, json.dumps(
                        {"action": "terminate", "time": iso_utc(at)}))
                else:
                    self._send(404, "")

            def _send(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", procs.free_port()), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(POLL_SHUTDOWN_S,),
                         name="metadata", daemon=True).start()

    def base_for(self, instance_id: str) -> str:
        """The metadata URL to give one instance (VOICE_METADATA_URL)."""
        return f"{self.url}/{instance_id}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
