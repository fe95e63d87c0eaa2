"""Run one worker node.

    voicectl node --join URL --token T [--public-url ws://HOST:PORT | auto] [--port P]
    python -m worker_node --standalone --package models/miku --ticket-key K

Joined, the node gets its id, model and ticket key from the control plane and heartbeats
there over HTTP(S); it holds no Redis or database credentials. Standalone, it serves
tickets signed with the key it is given and reports to nobody (benchmarks, a research
team trying a model). SIGTERM drains: no new streams, live ones may finish for
--drain-s, then are told to resume elsewhere, and the node leaves the fleet. A cloud VM
(`--public-url auto`) also polls its instance metadata for a spot interruption notice and
tells the control plane, which moves its users before the machine goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from setproctitle import setproctitle

from common.config import NODE_PORT
from common.errors import PackageError
from common.grant import Grant
from common.package import load_manifest, unpack
from worker_node import package
from worker_node.agent import ORPHAN_AFTER_S, Agent
from worker_node.control import ControlClient, ControlError, Refused
from worker_node.metadata import (
    DEFAULT_METADATA_URL,
    MetadataError,
    SpotWatch,
    public_address,
    watch_spot,
)
from worker_node.package import Loaded
from worker_node.runtime import NodeRuntime
from worker_node.server import NodeServer

log = logging.getLogger("worker_node")
JOIN_PATIENCE_S = 60.0     # keep trying an unreachable control plane this long at boot


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voicectl node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--join", metavar="URL", help="the control plane (VOICE_PUBLIC_URL)")
    p.add_argument("--token", help="one-time join token (user-data, or voicectl byo-token)")
    p.add_argument("--public-url", help="where browsers reach this node, ws://HOST:PORT or "
                   "wss://HOST:PORT, or `auto`: this VM's public address from the cloud's "
                   "instance metadata service (VOICE_METADATA_URL) and --port "
                   f"(default {NODE_PORT}) (default: ws://HOST:PORT of --host/--port)")
    p.add_argument("--metadata-url", default=os.environ.get("VOICE_METADATA_URL",
                                                            DEFAULT_METADATA_URL),
                   help="the instance metadata service --public-url auto asks, and then "
                        "polls every heartbeat for a spot interruption notice "
                        "(default: VOICE_METADATA_URL, else %(default)s)")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1, or "
                   "0.0.0.0 with --public-url)")
    p.add_argument("--port", type=int, default=None,
                   help="listen port (default: --public-url's, else a free one)")
    p.add_argument("--cert", help="TLS certificate (PEM): serve wss://")
    p.add_argument("--key", help="TLS private key (PEM) for --cert")
    p.add_argument("--drain-s", type=float, default=30.0,
                   help="on SIGTERM, how long live streams may go on before leaving")
    p.add_argument("--standalone", action="store_true", help="serve without a control plane")
    p.add_argument("--package", metavar="DIR", help="standalone: the model package directory "
                   "to serve (model.toml and its code)")
    p.add_argument("--version", default="1")
    p.add_argument("--ticket-key", help="standalone: the key tickets are signed with")
    p.add_argument("--node-id", default=None, help="standalone: the node id tickets name")
    p.add_argument("--load-s", type=float, default=None,
                   help="the stand-in model's load time (default: the control plane's)")
    p.add_argument("--crash-rate", type=float, default=None,
                   help="the stand-in model's crash chance per minute (default: the control "
                        "plane's CRASH_RATE)")
    p.add_argument("--clock-skew-s", type=float, default=0.0,
                   help="fault injection: this machine's clock runs this far off (the node "
                        "keeps the control plane's time anyway)")
    p.add_argument("--orphan-s", type=float, default=ORPHAN_AFTER_S,
                   help="exit after this long without reaching the control plane while "
                        f"streaming nothing (default {ORPHAN_AFTER_S:g}; streams go on)")
    return p


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listen(args: argparse.Namespace) -> tuple[str, int, str]:
    """Host, port and public URL (the port is chosen now, so the URL can be announced)."""
    scheme = "wss" if args.cert else "ws"
    public = (args.public_url or "").rstrip("/")
    if public == "auto":   # a cloud VM: its address from the metadata service, our port
        port = NODE_PORT if args.port is None else args.port
        port = port or _free_port("0.0.0.0")
        url = f"{scheme}://{public_address(args.metadata_url)}:{port}/ws"
        return args.host or "0.0.0.0", port, url
    host = args.host or ("0.0.0.0" if public else "127.0.0.1")
    port = args.port or None     # 0: a free one
    if port is None and public:
        port = int(public.split("://", 1)[1].split("/", 1)[0].rpartition(":")[2] or 0)
    port = port or _free_port(host)
    url = (public or f"{scheme}://{host}:{port}")
    return host, port, url if url.endswith("/ws") else url + "/ws"


def _join(control: ControlClient, token: str, url: str) -> Grant:
    deadline = time.monotonic() + JOIN_PATIENCE_S
    while True:
        try:
            return control.join(token, url)
        except Refused:
            raise
        except ControlError as e:
            if time.monotonic() > deadline:
                raise
            log.warning("%s; retrying", e)
            time.sleep(1.0)


def package_loader(control: ControlClient, local: Path | None) -> Callable[[str], Loaded]:
    """How this node loads a model: fetch the package by digest with its own credential,
    check the digest, unpack it into a directory of its own per version, import it, and
    warm it up (a first stream's worth of audio); standalone, from a local directory."""
    root = Path(tempfile.mkdtemp(prefix="voice-node-"))

    def load(digest: str) -> Loaded:
        if local is not None:
            loaded = package.load(local)
        else:
            dest = root / digest
            if not dest.is_dir():
                unpack(control.package(digest), digest, dest)
            loaded = package.load(dest, tag=digest[:16])
        loaded.make(package.CHECK_RATE).process(package.test_audio(package.CHECK_RATE, 0.2))
        return loaded
    return load


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.token or args.ticket_key:   # `ps` shows arguments to every local user
        hide = {args.token, args.ticket_key} - {None}
        setproctitle(" ".join("***" if a in hide else a for a in sys.argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node %(message)s")
    if not args.standalone and not (args.join and args.token):
        print("voicectl node: give --join URL --token T (a join token from the control plane: "
              "the VM's user-data, or `voicectl byo-token --region R`), or --standalone",
              file=sys.stderr)
        return 2
    if bool(args.cert) != bool(args.key):
        print("voicectl node: --cert and --key go together (PEM files)", file=sys.stderr)
        return 2
    try:
        host, port, url = _listen(args)
    except MetadataError as e:
        print(f"voicectl node: --public-url auto: {e}", file=sys.stderr)
        return 2
    control = ControlClient(args.join or "")
    if args.standalone:
        if not args.package:
            print("voicectl node --standalone: give --package DIR (a model package)",
                  file=sys.stderr)
            return 2
        try:
            manifest = load_manifest(Path(args.package))
        except PackageError as e:
            print(f"voicectl node: {e}", file=sys.stderr)
            return 2
        grant = Grant(args.node_id or f"n-{uuid.uuid4().hex[:10]}", "", args.ticket_key or "",
                      manifest.name, args.version, "", manifest.streams_per_gpu, "local",
                      "standalone", 2.0, args.load_s or 0.0, args.crash_rate or 0.0)
    else:
        try:
            grant = _join(control, args.token, url)
        except ControlError as e:
            print(f"voicectl node: could not join {args.join}: {e}", file=sys.stderr)
            return 3
        knobs = {k: v for k, v in (("model_load_s", args.load_s),
                                   ("crash_rate", args.crash_rate)) if v is not None}
        grant = dataclasses.replace(grant, **knobs)   # type: ignore[arg-type]
    node = NodeRuntime(id=grant.node_id, model=grant.model, version=grant.version,
                       region=grant.region, provider=grant.provider, digest=grant.digest,
                       capacity=grant.capacity, load_s=grant.model_load_s, url=url,
                       local_clock=lambda: time.time() + args.clock_skew_s)
    warm_up = package_loader(control, Path(args.package) if args.standalone else None)
    agent = Agent(node, control, grant.heartbeat_interval_s, grant.crash_rate, warm_up=warm_up,
                  orphan_s=args.orphan_s)
    hooks = {} if args.standalone else {"on_open": agent.on_open, "on_close": agent.on_close,
                                        "on_order": agent.control_order}
    server = NodeServer(node, grant.ticket_key, **hooks)   # type: ignore[arg-type]
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    if not args.standalone:
        agent.start()
        if (args.public_url or "").rstrip("/") == "auto":   # a cloud VM: its metadata answered
            log.info("watching %s for spot interruption notices", args.metadata_url)
            watch_spot(SpotWatch(args.metadata_url), grant.heartbeat_interval_s,
                       agent.interrupted, threading.Event())
    threading.Thread(target=node.load, args=(warm_up, agent.poke), name="load",
                     daemon=True).start()

    def leave(*_: object) -> None:
        threading.Thread(target=_drain_and_leave, args=(node, agent, control, server,
                                                        args.drain_s, args.standalone),
                         name="leave", daemon=True).start()
    signal.signal(signal.SIGTERM, leave)
    server.start(host, port, tls)
    log.info("%s serving %s v%s in %s at %s (loading %.1f s)", node.id, node.model,
             node.version, node.region, node.url, grant.model_load_s)
    try:
        server.stopped.wait()
    except KeyboardInterrupt:
        pass
    agent.stop()
    return 0


def _drain_and_leave(node: NodeRuntime, agent: Agent, control: ControlClient,
                     server: NodeServer,
                     drain_s: float, standalone: bool) -> None:
    """SIGTERM: take no new streams, let live ones finish, move the rest, leave, stop."""
    deadline = time.time() + drain_s
    agent.leaving = True
    node.drain(deadline, time.time(), min_move_s=0)
    if node.streams:
        log.info("SIGTERM: draining %d stream(s) for up to %.0f s", len(node.streams), drain_s)
    agent.poke()
    while node.streams and time.time() < deadline:
        node.drain(deadline, time.time(), min_move_s=0)   # tells streams to move in time
        time.sleep(0.1)
    # at the deadline: the rest resume elsewhere
    node.drain(deadline, max(time.time(), deadline), min_move_s=0)
    time.sleep(0.2)
    if not standalone:
        agent.stop()
        try:
            control.leave()
            log.info("left the fleet")
        except ControlError as e:
            log.warning("could not say goodbye (%s); the control plane will reap us", e)
    server.stop()


if __name__ == "__main__":
    sys.exit(main())
