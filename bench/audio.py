"""Audio benchmark: the shifter offline (CPU, latency, quality vs the naive per-chunk
librosa approach) and the WebSocket round trip through a real node on loopback with 1 and
4 concurrent real-time-paced streams (20 ms frames, phases spread over the frame), all
driven by one client thread so that the client's own threads add no GIL hand-offs to what
is measured; `rtt_p99_over_p50_4streams` is the tail's ratio to the median.

    python bench/audio.py [--seconds 10] [--baseline-ref REV] [--json]

The node runs three ways in one run, so the figures sit beside their baselines: as shipped
(its loop thread at real-time priority where allowed), without CAP_SYS_NICE (`normal`: what
the priority buys), and, with --baseline-ref, the node of an earlier commit (its `_base`
figures; e.g. the hand-written selector loop this asyncio server replaced).

With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
from audio_offline import offline_figures  # noqa: E402
from report import report  # noqa: E402
from simple_websocket import Client  # noqa: E402

from common.tickets import Ticket, sign  # noqa: E402
from voicectl import procs  # noqa: E402
from worker_node.priority import raise_priority  # noqa: E402

RATE, FRAME = 48000, 960   # 20 ms frames at 48 kHz
SECRET = "bench-secret"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class _NoThread:
    """simple_websocket's client starts a reader thread; `_Wire` reads its socket itself."""

    def __init__(self, target: Any) -> None:
        self.name = "bench-wire"

    def start(self) -> None:
        pass


class _Wire:
    """A bare WebSocket client for one stream: blocking handshake, then non-blocking
    frames driven by `_run_streams`' single thread. Client frames carry a zero mask (legal:
    the payload goes as is), so sending costs one syscall and no Python byte work; server
    frames are read by their 4-byte header. No reader thread, so the client adds no GIL
    hand-off of its own to what it measures."""

    def __init__(self, url: str, node_id: str, user: str) -> None:
        ticket = sign(Ticket(user, f"s-{user}", node_id, "miku", "1", 1, time.time() + 60),
                      SECRET)
        ws = Client.connect(f"{url}?ticket={ticket}", thread_class=_NoThread)   # handshake
        ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
        self.ws, self.sock = ws, ws.sock
        self.sock.settimeout(5)
        head = self.sock.recv(2, socket.MSG_WAITALL)   # the "started" text frame (< 126 B)
        started = self.sock.recv(head[1], socket.MSG_WAITALL)
        if head[0] != 0x81 or b'"started"' not in started:
            raise RuntimeError(f"node did not start stream {user}: {head + started!r}")
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # no Nagle here
        t = np.arange(FRAME) / RATE
        pcm = (np.sin(2 * np.pi * 180 * t) * 8000).astype("<i2").tobytes()
        self.frame = b"\x82\xfe" + len(pcm).to_bytes(2, "big") + b"\0\0\0\0" + pcm
        self.answer = 4 + len(pcm)
        self.buf = bytearray()
        self.sent_at: list[float] = []

    def send(self) -> None:
        self.sent_at.append(time.perf_counter())
        self.sock.setblocking(True)
        self.sock.sendall(self.frame)
        self.sock.setblocking(False)

    def read(self, rtts: list[float]) -> None:
        try:
            self.buf += self.sock.recv(65536)
        except BlockingIOError:
            return
        while len(self.buf) >= self.answer and self.sent_at:
            del self.buf[:self.answer]
            rtts.append(1000 * (time.perf_counter() - self.sent_at.pop(0)))

    def stop(self) -> None:
        self.sock.setblocking(True)
        self.ws.send(json.dumps({"type": "stop"}))
        self.sock.close()


def _run_streams(url: str, node_id: str, n: int, seconds: float) -> list[float]:
    """`n` real-time streams of 20 ms frames, phases spread over the frame, one thread."""
    wires = [_Wire(url, node_id, f"u{n}-{i}") for i in range(n)]
    sel = selectors.DefaultSelector()
    for w in wires:
        sel.register(w.sock, selectors.EVENT_READ, w)
    rtts: list[float] = []
    start = time.perf_counter()
    due = [start + 0.02 * i / n for i in range(n)]
    frames = int(seconds / 0.02)
    sent = [0] * n
    while any(s < frames for s in sent) or any(w.sent_at for w in wires):
        now = time.perf_counter()
        for i, w in enumerate(wires):
            if sent[i] < frames and due[i] <= now:
                w.send()
                sent[i] += 1
                due[i] += 0.02
        if now - start > seconds + 5:
            raise RuntimeError("node stopped answering")
        wait = min((d for i, d in enumerate(due) if sent[i] < frames), default=now + 0.01)
        for key, _ in sel.select(max(0.0, wait - time.perf_counter())):
            key.data.read(rtts)
    for w in wires:
        w.stop()
    return rtts


def _client_thread(url: str, n: int, seconds: float, figures: dict[str, Any]) -> list[float]:
    """`_run_streams` on a thread of its own scheduled as the node's audio thread is: the
    client stands for browsers on other machines, so its own wake-up delays on this shared
    machine are not the node's to answer for (measured: they were most of the tail)."""
    out: list[list[float]] = []

    def run() -> None:
        figures["client_scheduling"] = raise_priority(threading.get_native_id())
        out.append(_run_streams(url, "bench-node", n, seconds))

    t = threading.Thread(target=run, name="bench-client")
    t.start()
    t.join()
    if not out:
        raise RuntimeError("the bench client failed; see its traceback above")
    return out[0]


def rtt_figures(seconds: float, suffix: str = "", prefix: tuple[str, ...] = (),
                root: Path = ROOT) -> dict[str, Any]:
    """Round trip of one 20 ms frame through a real node process on loopback (standalone:
    serving tickets signed with the key it is given, no control plane). `prefix` runs it
    under another command (setpriv), `root` from another checkout."""
    port = procs.free_port()
    node = procs.spawn([*prefix, sys.executable, "-m", "worker_node", "--standalone",
                        "--package", str(ROOT / "models" / "miku"), "--ticket-key", SECRET,
                        "--node-id", "bench-node",
                        "--port", str(port), "--load-s", "0.2"],
                       log=ROOT / "var" / "logs" / f"bench-audio-node{suffix}.log", cwd=root)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if json.load(r)["state"] == "ready":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or node.poll() is not None:
                raise RuntimeError("bench node did not become ready; see "
                                   f"var/logs/bench-audio-node{suffix}.log")
            time.sleep(0.1)
        figures: dict[str, Any] = {}
        for n in (1, 4):
            log(f"round trip{suffix} with {n} concurrent real-time stream(s) for {seconds:g} s")
            rtts = _client_thread(f"ws://127.0.0.1:{port}/ws", n, seconds, figures)
            label = ("1stream" if n == 1 else f"{n}streams") + suffix
            figures[f"rtt_ms_p50_{label}"] = round(float(np.percentile(rtts, 50)), 3)
            figures[f"rtt_ms_p99_{label}"] = round(float(np.percentile(rtts, 99)), 3)
            figures[f"frames_{label}"] = len(rtts)
            time.sleep(0.5)   # let the node settle the closed streams
        figures[f"rtt_p99_over_p50_4streams{suffix}"] = round(
            figures[f"rtt_ms_p99_4streams{suffix}"] / figures[f"rtt_ms_p50_4streams{suffix}"], 2)
        return figures
    finally:
        procs.stop([node])


def _checkout(ref: str) -> Path:
    """The tree of commit `ref`, unpacked beside the var/ folder (no git state changes)."""
    dest = ROOT / "var" / f"bench-base-{ref}"
    if not dest.is_dir():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per round-trip run")
    p.add_argument("--baseline-ref", metavar="REV",
                   help="also measure the node of this commit (figures ending _base)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    log("offline shifter figures (CPU, latency, quality, naive baseline) ...")
    figures = offline_figures()
    figures.update(rtt_figures(args.seconds))
    if shutil.which("setpriv"):   # no CAP_SYS_NICE: the loop thread at the normal priority
        figures.update(rtt_figures(args.seconds, "_normal", (
            "setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--")))
    if args.baseline_ref:
        figures.update(rtt_figures(args.seconds, "_base", root=_checkout(args.baseline_ref)))
    for suffix in ("_normal", "_base"):
        if f"rtt_ms_p99_4streams{suffix}" in figures:
            figures[f"rtt_p99_4streams_vs{suffix}"] = round(
                figures["rtt_ms_p99_4streams"] / figures[f"rtt_ms_p99_4streams{suffix}"], 2)
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
