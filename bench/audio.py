"""Audio benchmark: the shifter offline (CPU, latency, quality vs the naive per-chunk
librosa approach) and the WebSocket round trip through a real node on loopback with 1 and
4 concurrent real-time-paced streams.

    python bench/audio.py [--seconds 10] [--json]

With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
from audio_offline import offline_figures  # noqa: E402
from report import report  # noqa: E402
from simple_websocket import Client  # noqa: E402

from common.tickets import Ticket, sign  # noqa: E402
from provisioner.state import State, connect  # noqa: E402
from voicectl import procs  # noqa: E402

RATE, FRAME = 48000, 960   # 20 ms frames at 48 kHz
SECRET = "bench-secret"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _stream(url: str, node_id: str, user: str, seconds: float, out: list[float]) -> None:
    ticket = sign(Ticket(user, f"s-{user}", node_id, "miku", "1", 1, time.time() + 60), SECRET)
    ws = Client.connect(f"{url}?ticket={ticket}")
    ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
    ws.receive(timeout=5)
    t = np.arange(FRAME) / RATE
    frame = (np.sin(2 * np.pi * 180 * t) * 8000).astype("<i2").tobytes()
    start = time.perf_counter()
    for i in range(int(seconds / 0.02)):
        sent = time.perf_counter()
        ws.send(frame)
        ws.receive(timeout=5)
        out.append(1000 * (time.perf_counter() - sent))
        time.sleep(max(0.0, start + (i + 1) * 0.02 - time.perf_counter()))  # real time
    ws.send(json.dumps({"type": "stop"}))
    time.sleep(0.05)


def rtt_figures(seconds: float) -> dict[str, Any]:
    """Round trip of one 20 ms frame through a real node process on loopback."""
    url, redis_proc = procs.start_redis()
    env = {**os.environ, "REDIS_URL": url, "TICKET_SECRET": SECRET, "MODEL_LOAD_SECONDS": "0.2"}
    node = procs.start_node("miku", "us-west", env, node_id="bench-node")
    try:
        state = State(connect(url))
        deadline = time.monotonic() + 60
        while (rec := state.node("bench-node")) is None or rec.state.value != "ready":
            if time.monotonic() > deadline:
                raise RuntimeError("bench node did not become ready")
            time.sleep(0.1)
        figures: dict[str, Any] = {}
        for n in (1, 4):
            log(f"round trip with {n} concurrent real-time stream(s) for {seconds:g} s ...")
            rtts: list[float] = []
            threads = [threading.Thread(target=_stream, args=(rec.url, "bench-node",
                                                              f"u{n}-{i}", seconds, rtts))
                       for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            label = "1stream" if n == 1 else f"{n}streams"
            figures[f"rtt_ms_p50_{label}"] = round(float(np.percentile(rtts, 50)), 3)
            figures[f"rtt_ms_p99_{label}"] = round(float(np.percentile(rtts, 99)), 3)
            figures[f"frames_{label}"] = len(rtts)
        return figures
    finally:
        procs.stop([node, redis_proc])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per round-trip run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    log("offline shifter figures (CPU, latency, quality, naive baseline) ...")
    figures = offline_figures()
    figures.update(rtt_figures(args.seconds))
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
