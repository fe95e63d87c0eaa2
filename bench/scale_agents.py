"""bench/scale.py's simulated node agents, in a process of their own: each joins like a
node (one-time token), holds its heartbeat socket and beats every interval with a report
shaped like a real node's, so the webapp carries the fleet's whole heartbeat load."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import websockets

JOIN_CONCURRENCY = 50


class Http:
    """One keep-alive HTTP/1.1 connection, as a node's requests.Session keeps one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any], credential: str = "",
                   ) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        auth = f"Authorization: Bearer {credential}\r\n" if credential else ""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                f"{auth}\r\n").encode()
        for attempt in (1, 2):   # a connection the server closed: reconnect once
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host,
                                                                             self.port)
                assert self.reader is not None
                self.writer.write(head + data)
                await self.writer.drain()
                raw = await self.reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (h.partition(":") for h in lines[1:] if h)}
                if "content-length" in headers:
                    payload = await self.reader.readexactly(int(headers["content-length"]))
                else:
                    payload = await self.reader.read()
                    headers["connection"] = "close"
                if headers.get("connection", "").lower() == "close":
                    self.close()
                return status, payload
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def node_report(i: int, serving: str, now: float) -> dict[str, Any]:
    """What agent `i` says of itself: ready; every fourth node streams two users."""
    streams, usage = [], []
    if i % 4 == 0:
        minute = int(now // 60 * 60)
        for k in range(2):
            user, session, conn = f"sim{i}-{k}", f"s-sim{i}-{k}", f"{i * 2 + k:x}"
            streams.append([user, session, 1, conn])
            usage.append([minute, user, session, conn, round(min(60.0, now - minute), 4)])
    return {"state": "ready", "progress": 1.0, "eta_ready_s": 0, "ready_at": now - 60,
            "serving": serving, "streams": streams, "usage": usage, "closed": []}


async def _agents(base_url: str, tokens: list[str], ctl: Connection) -> None:
    host, _, port = base_url.split("://", 1)[1].rpartition(":")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    threading.Thread(target=lambda: (ctl.recv(), loop.call_soon_threadsafe(stop.set)),
                     daemon=True).start()
    conns = [Http(host, int(port)) for _ in tokens]
    sem = asyncio.Semaphore(JOIN_CONCURRENCY)
    url_base = "ws://10.{}.{}.{}:8443/ws"

    async def join(i: int) -> dict[str, Any]:
        async with sem:
            status, body = await conns[i].post("/api/nodes/join", {
                "token": tokens[i], "url": url_base.format(i >> 16, (i >> 8) & 255, i & 255)})
        if status != 200:
            raise RuntimeError(f"join of simulated node {i} answered {status}: {body[:300]!r}")
        return dict(json.loads(body))

    t0 = time.perf_counter()
    grants = await asyncio.gather(*(join(i) for i in range(len(tokens))))
    ctl.send(("joined", time.perf_counter() - t0))
    beats: list[tuple[float, float, int]] = []    # (monotonic end, round trip s, status)

    async def agent(i: int, grant: dict[str, Any]) -> None:
        serving = f"{grant['model']}:{grant['version']}"
        interval = float(grant["heartbeat_interval_s"])
        await asyncio.sleep(random.uniform(0, interval))   # machines booted at other times
        ws = None
        while not stop.is_set():
            t = time.perf_counter()
            try:   # like worker_node/control.py: one heartbeat socket, reopened on failure
                if ws is None:
                    ws = await websockets.connect(
                        f"ws://{host}:{port}/api/nodes/beat", compression=None,
                        additional_headers={"Authorization": f"Bearer {grant['credential']}"})
                await ws.send(json.dumps(node_report(i, serving, time.time())))
                answer = json.loads(await ws.recv())
                status = 401 if "error" in answer else 200
            except (TimeoutError, OSError, websockets.ConnectionClosed):
                status, ws = 0, None
            beats.append((time.monotonic(), time.perf_counter() - t, status))
            try:   # like worker_node/agent.py: beat, then wait the interval
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
        if ws is not None:
            await ws.close()

    tasks = [asyncio.create_task(agent(i, g)) for i, g in enumerate(grants)]
    await stop.wait()
    for task in tasks:   # a beat still waiting for its answer is past the window: drop it
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in conns:
        c.close()
    ctl.send(("done", beats))


def agents_main(base_url: str, tokens: list[str], ctl: Connection) -> None:
    """The simulated machines: one process, one event loop, a socket each, at the lowest
    priority: they stand for machines elsewhere, so their CPU should not be taken from the
    control plane's on this shared box (it still is, whenever a core is free of both)."""
    os.nice(19)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, len(tokens) + 256)), hard))
    asyncio.run(_agents(base_url, tokens, ctl))
