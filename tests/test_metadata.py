"""A cloud node learns its public address from the instance metadata service."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from voicectl import devcloud, procs
from worker_node.metadata import MetadataError, public_address


@pytest.fixture
def ec2_metadata() -> Iterator[devcloud.Metadata]:
    meta = devcloud.Metadata("203.0.113.7")
    yield meta
    meta.close()


def test_ec2_address_through_imdsv2(ec2_metadata: devcloud.Metadata) -> None:
    # the dev cloud's service refuses a GET without the session token, as IMDSv2-only does
    assert public_address(ec2_metadata.url) == "203.0.113.7"
    assert ec2_metadata.asked == 1


def test_gce_address_with_its_header() -> None:
    class Gce(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = (self.headers.get("Metadata-Flavor") == "Google" and self.path ==
                  "/computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip")
            body = b"198.51.100.4" if ok else b""
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert public_address(f"http://127.0.0.1:{server.server_address[1]}") == "198.51.100.4"
    finally:
        server.shutdown()
        server.server_close()


def test_no_metadata_service_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{procs.free_port()}"      # nothing listens there
    with pytest.raises(MetadataError, match="pass --public-url ws://HOST:PORT"):
        public_address(url)


def test_node_without_metadata_refuses_to_start() -> None:
    """`--public-url auto` off a cloud: the node says what to pass instead, and exits 2."""
    env = devcloud.minimal_env(VOICE_METADATA_URL=f"http://127.0.0.1:{procs.free_port()}")
    done = subprocess.run([sys.executable, "-m", "worker_node", "--join", "http://127.0.0.1:9",
                           "--token", "j-x", "--public-url", "auto", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--public-url auto" in done.stderr and "pass --public-url ws://HOST:PORT" in done.stderr
