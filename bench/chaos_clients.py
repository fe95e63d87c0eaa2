"""bench/chaos.py's clients, in a process of their own (they stand for browsers elsewhere):
each opens the lobby, streams 20 ms frames of 16-bit PCM at 16 kHz at real-time pace to the
node named by `ready`, and after any close or error resumes through the lobby with
`resume=SESSION` (docs/protocol.md), recording every drop and when audio flowed again."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from connect import log  # noqa: E402

RATE, FRAME_S = 16000, 0.02
MODEL = "miku"
# Clients say where they are, as the page does when nobody picks a region: the control plane
# chooses the region and may move them (a user who names one with region= pins it, and
# waits there through an outage).
LOCATIONS = {"us-west": (37.7, -122.3), "us-east": (38.9, -77.4)}


def _frame() -> bytes:
    t = np.arange(int(RATE * FRAME_S)) / RATE
    return (6000 * np.sin(2 * np.pi * 150.0 * t)).astype("<i2").tobytes()


async def _lobby(ws_url: str, query: str) -> dict[str, Any]:
    """Open the lobby and read until `ready` or `error`."""
    async with websockets.connect(f"{ws_url}/ws/session?{query}", compression=None,
                                  open_timeout=10, close_timeout=1) as ws:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] in ("ready", "error"):
                return dict(msg)
    raise ConnectionError("the lobby closed without ready or error")


async def _open(ready: dict[str, Any]) -> Any:
    """A started stream on the node `ready` names."""
    ws = await websockets.connect(f"{ready['node_url']}?ticket={ready['ticket']}",
                                  compression=None, open_timeout=5, close_timeout=1)
    await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
    started = json.loads(await asyncio.wait_for(ws.recv(), 5))
    if started.get("type") != "started":
        await ws.close()
        raise ValueError(f"refused by node: {started}")
    return ws


async def _stream(ready: dict[str, Any], c: dict[str, Any], end_at: float, ws_url: str,
                  resume: str) -> str:
    """Stream real-time frames to the node until `end_at` (then stop: "end") or until the
    stream breaks (a reason). Counts answered frames in c["answered"]. A node's `move`
    (a planned move) is made as the page makes it: the lobby (`resume`) and the new stream
    first, then `stop` to the old one while frames go to the new (make-before-break),
    counted in c["moves"]."""
    frame = _frame()
    ws = await _open(ready)
    moving: list[asyncio.Task[dict[str, Any]]] = []
    retiring: list[asyncio.Task[None]] = []   # old streams of moves, answering their rest

    async def read(conn: Any) -> None:
        async for msg in conn:
            if isinstance(msg, bytes):
                c["answered"] += 1
                drop = c["drops"][-1] if c["drops"] else None
                if drop and drop["t_streaming"] is None:
                    drop["t_streaming"] = time.time()
            elif json.loads(msg).get("type") == "move" and not moving and conn is ws:
                moving.append(asyncio.create_task(_lobby(ws_url, resume)))

    reader = asyncio.create_task(read(ws))
    next_t = time.monotonic()
    try:
        while time.time() < end_at and not reader.done():
            await ws.send(frame)
            if moving and moving[0].done():
                new = moving.pop().result()
                if new["type"] == "ready":   # the new stream first, then the old one stops
                    old, old_reader = ws, reader
                    ws = await _open(new)
                    reader = asyncio.create_task(read(ws))
                    retiring.append(asyncio.create_task(_retire(old, old_reader)))
                    c["moves"] += 1
            next_t = max(next_t + FRAME_S, time.monotonic() - 0.2)  # no burst after a stall
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        if reader.done():
            reader.result()      # raises what broke it
            return f"closed {ws.close_code}"
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reader, 5)   # the node answers the rest, then closes 1000
        c["stopped_clean"] = ws.close_code == 1000
        return "end"
    finally:
        reader.cancel()
        for task in moving:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await ws.close()


async def _retire(old: Any, old_reader: asyncio.Task[None]) -> None:
    """The old stream of a planned move: `stop`, its last answers, its close."""
    try:
        await old.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(old_reader, 5)
    finally:
        old_reader.cancel()
        await old.close()


async def _client(i: int, ws_url: str, tag: str, end_at: float) -> dict[str, Any]:
    near = list(LOCATIONS)[i % len(LOCATIONS)]
    lat, lon = LOCATIONS[near]
    c: dict[str, Any] = {"user": f"chaos-{tag}-{i}", "near": near, "answered": 0,
                         "sessions": [], "drops": [], "refused_resumes": 0, "errors": Counter(),
                         "stopped_clean": False, "moves": 0}
    session: str | None = None
    while time.time() < end_at:
        query = f"user={c['user']}&model={MODEL}&lat={lat}&lon={lon}"
        if session:
            query += f"&resume={session}"
        try:
            msg = await asyncio.wait_for(_lobby(ws_url, query), max(1.0, end_at - time.time()))
        except (TimeoutError, OSError, ValueError, websockets.WebSocketException) as e:
            c["errors"][f"lobby {type(e).__name__}"] += 1
            await asyncio.sleep(0.5)
            continue
        if msg["type"] == "error":
            c["errors"][f"lobby {msg['code']}"] += 1
            if session and msg["code"] == "bad_request":   # "not a session of user": lost
                log(f"client {i}: resume of {session} refused ({msg['message']}); new session")
                c["refused_resumes"] += 1
                session = None
            await asyncio.sleep(0.5)
            continue
        if session is not None and msg["session_id"] != session:   # resumed as another: lost
            log(f"client {i}: resume of {session} answered with session {msg['session_id']}")
            c["refused_resumes"] += 1
        if session is None or msg["session_id"] != session:
            session = msg["session_id"]
            c["sessions"].append(session)
        drop = c["drops"][-1] if c["drops"] else None
        if drop and drop["t_ready"] is None:
            drop["t_ready"] = time.time()
        if drop and drop["t_streaming"] is None:
            drop["resumed_on"] = msg["node_id"]
        try:
            why = await _stream(msg, c, end_at, ws_url,
                                f"user={c['user']}&model={MODEL}&lat={lat}&lon={lon}"
                                f"&resume={session}")
        except (TimeoutError, OSError, ValueError, websockets.WebSocketException) as e:
            why = f"{type(e).__name__}: {e}"[:80]
        if why == "end":
            break
        if not c["drops"] or c["drops"][-1]["t_streaming"] is not None:   # a new drop
            c["drops"].append({"session": session, "node": msg["node_id"], "why": why,
                               "t_drop": time.time(), "t_ready": None, "t_streaming": None})
            log(f"client {i}: stream on {msg['node_id']} dropped ({why}); resuming")
        await asyncio.sleep(0.05)
    c["t_end"] = time.time()
    c["errors"] = dict(c["errors"])
    return c


def run_clients(ws_url: str, n: int, tag: str, end_at: float) -> list[dict[str, Any]]:
    async def everyone() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_client(i, ws_url, tag, end_at) for i in range(n))))

    return asyncio.run(everyone())
