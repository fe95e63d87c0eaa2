"""The shipped reverse proxy (deploy/nginx.conf) with Debian's nginx in front of the real
webapp (gunicorn, gevent): TLS termination, https redirect, wss lobbies, a Secure cookie
behind it, the per-address connection limit, and slow sockets held by the proxy while the
webapp serves on. Only the marked paths and addresses of the file are rewritten."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import local_webapp
from simple_websocket import Client
from simple_websocket.errors import ConnectionError as WsConnectionError

from common.config import Config
from voicectl import procs

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not Path(NGINX).exists(),
                                reason="Debian's nginx is not installed (apt-get install nginx)")


@pytest.fixture
def proxied(cfg: Config, tmp_path: Path) -> Iterator[tuple[int, int, str]]:
    """(https port, http port, its certificate) of nginx in front of the webapp, which
    believes one proxy."""
    procs.self_signed(tmp_path)
    web, webapp = local_webapp(cfg, tmp_path, trusted_proxies=1, lobby_sockets_per_client=0,
                               lobby_attempts_per_client=0, lobby_limit_exempt=[])
    http, https = procs.free_port(), procs.free_port()
    (tmp_path / "nginx.conf").write_text(procs.nginx_config(tmp_path, web, http, https))
    nginx = procs.spawn([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                         "-e", str(tmp_path / "nginx.log"), "-g", "daemon off;"],
                        log=tmp_path / "nginx.out")
    deadline = time.monotonic() + 20
    while procs.port_free("127.0.0.1", https):
        assert nginx.poll() is None and time.monotonic() < deadline, (
            (tmp_path / "nginx.out").read_text() + (tmp_path / "nginx.log").read_text())
        time.sleep(0.05)
    try:
        yield https, http, str(tmp_path / "cert.pem")
    finally:
        procs.stop([nginx, webapp])


def tls(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


def test_tls_redirect_and_a_secure_cookie_behind_the_proxy(
        proxied: tuple[int, int, str]) -> None:
    https, http, cert = proxied
    page = requests.get(f"https://127.0.0.1:{https}/", verify=cert, timeout=10)
    assert page.status_code == 200 and "Secure" in page.headers["Set-Cookie"]
    plain = requests.get(f"http://127.0.0.1:{http}/x", allow_redirects=False, timeout=10)
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
    lobby = Client.connect(f"wss://127.0.0.1:{https}/ws/session?user=w1&model=miku"
                           "&region=us-west", ssl_context=tls(cert))
    assert json.loads(lobby.receive(timeout=10))["type"] in ("queued", "booting")
    lobby.close()


def test_one_address_gets_200_connections_and_the_webapp_serves_on(
        proxied: tuple[int, int, str]) -> None:
    """200 lobbies from one address wait; the 201st is refused (429) by the proxy; 300
    sockets that never finish their headers are the proxy's to hold; /healthz answers."""
    https, _, cert = proxied
    ctx = tls(cert)
    held = [Client.connect(f"wss://127.0.0.1:{https}/ws/session?user=c{i}&model=miku"
                           "&region=ap-northeast", ssl_context=ctx) for i in range(200)]
    try:
        with pytest.raises(WsConnectionError, match="429"):   # refused at the handshake
            Client.connect(f"wss://127.0.0.1:{https}/ws/session?user=c200&model=miku"
                           "&region=ap-northeast", ssl_context=ctx)
        slow = []
        for _ in range(300):   # from another host
            s = socket.create_connection(("127.0.0.1", https), source_address=("127.0.0.3", 0))
            slow.append(s)
            s.sendall(b"\x16\x03\x01")   # the start of a TLS hello, then nothing
        t0 = time.monotonic()   # a third host is served as ever
        conn = http.client.HTTPSConnection("127.0.0.1", https, context=ctx, timeout=10,
                                           source_address=("127.0.0.2", 0))
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200 and time.monotonic() - t0 < 5
        conn.close()
        for s in slow:
            s.close()
    finally:
        for ws in held:
            ws.close()
