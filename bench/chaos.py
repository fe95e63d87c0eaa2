"""Chaos benchmark: N real-time clients stream through the whole local stack for M minutes
while nodes crash, a region dies, the Celery worker and Redis are killed; invariants are
checked throughout and billed seconds are compared with streamed ones at the end.

    python bench/chaos.py [--minutes 10] [--clients 8] [--crash-rate 0.3] [--load-s 2] [--json]

The stack is `voicectl run` (embedded Redis with its append-only file, SQLite billing, the
local cloud driver) in a temporary folder, with VOICE_DEV_USERS=1, MODEL_LOAD_SECONDS and
CRASH_RATE (each node's chance to crash in a given minute). The clients run in a process
of their own (they stand for browsers elsewhere): each opens the lobby (half in us-west,
half in us-east), streams 20 ms frames of 16-bit PCM at 16 kHz at real-time pace to the
node named by `ready`, and after any close or error resumes through the lobby with
`resume=SESSION` (docs/protocol.md). Faults, at fixed fractions of the run (the last fifth
is calm, so every drop has time to resume): `voicectl kill-node` on the busiest node
(15%), kill -9 of the Celery worker with its beat (30%), `voicectl kill-region` on the
busiest region (45%), kill -9 of the embedded Redis (65%); crashes from CRASH_RATE come
throughout.

Figures:
- `crashes`: node processes that died without being retired first (CRASH_RATE, kill-node,
  kill-region), seen by polling each VM's pid every 0.05 s; `crash_causes` splits them.
- `detect_s_max`: crash to the first sign in Redis that the control plane knows: a
  client's resume reported the node lost, or the reaper marked it dead or removed it
  (`detected_by` counts which; `detect_s_max_reaper` is the worst the reaper alone did).
- `sessions_affected`: sessions whose stream dropped at least once; `drops` counts drops.
  `planned_moves`: moves the control plane asked for (a node drained to consolidate its
  pool, or a recall), made as the page makes them (make-before-break): not drops.
- `resumed_fraction`, `resume_s_p50`, `resume_s_p95`: drops followed by audio flowing
  again in the same session, and the seconds from the client seeing the drop to the first
  answered frame after it; `resumed_within_2s_fraction` of all drops. The target (95%
  within 2 s) holds "with warm capacity": `warm_drops` are the drops resumed on a node that
  was already serving when the stream dropped (no boot was waited for), and
  `resumed_within_2s_fraction_warm`, `resume_s_p95_warm` are theirs.
- `lost_sessions`: sessions whose resume was refused (the client had to start a new one),
  plus drops still not resumed 60 s after they happened when the run ended.
- `invariant_violations`: distinct breaches seen by the checker (every 0.25 s, reading
  Redis through provisioner.state): more slots taken on a node than its capacity, a
  negative or shrinking usage counter, a fencing token going back, two live sessions of
  one user on live nodes; and at the end, a lock or a live slot still held by a client
  that stopped (`leaked_locks`, `leaked_slots`). `violations` lists the first ten.
- `billing_error_s_max`: per client, |seconds billed (usage_minutes, as `voicectl usage`
  reads it, once settlement stopped changing) - seconds streamed (frames the node
  answered, 20 ms each)|, the worst client; `billing_error_s_per_drop_max` divides each
  client's by the drops it went through (the tolerance is per crash).
- `orphans`: processes of the run (every descendant of `voicectl run` seen during it, every
  node VM, anything naming its ports) still alive after `voicectl run` stopped.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import redis

from billing.ledger import Ledger, day_totals

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos_clients import FRAME_S, LOCATIONS, run_clients  # noqa: E402
from chaos_stack import Stack, Watch, inject  # noqa: E402
from connect import log  # noqa: E402
from report import report  # noqa: E402

FAULTS = ((0.15, "kill-node"), (0.30, "celery-worker"), (0.45, "kill-region"),
          (0.65, "redis"))
LOST_AFTER_S = 60.0     # a drop not resumed this long before the end is a lost session


# --- the run ---------------------------------------------------------------------------

def billed_seconds(db_url: str, users: list[str]) -> dict[str, float]:
    """Seconds billed per user, as `voicectl usage --json` adds them up."""
    ledger = Ledger.open(db_url)
    try:
        rows = [r for r in ledger.usage() if r.user_id in users]
        out = {u: 0.0 for u in users}
        for row in day_totals(rows):
            out[row["user"]] += row["seconds"]
        return out
    finally:
        ledger.engine.dispose()


def settle(db_url: str, users: list[str], timeout_s: float = 45.0) -> dict[str, float]:
    """Billed seconds once three reads 2 s apart agree (the beat settles every tick)."""
    deadline, last, same = time.monotonic() + timeout_s, None, 0
    while time.monotonic() < deadline:
        time.sleep(2.0)
        got = billed_seconds(db_url, users)
        same = same + 1 if got == last else 0
        if same >= 2:
            break
        last = got
    return billed_seconds(db_url, users)


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def figures(clients: list[dict[str, Any]], watch: Watch, billed: dict[str, float],
            leaks: dict[str, list[str]], orphans: list[str], faults: list[str],
            minutes: float, t_end: float) -> dict[str, Any]:
    drops = [d for c in clients for d in c["drops"]]
    resumed = [d["t_streaming"] - d["t_drop"] for d in drops if d["t_streaming"]]
    warm = [d for d in drops if d["t_streaming"]
            and watch.ready_at.get(d.get("resumed_on", ""), t_end) < d["t_drop"]]
    resumed_warm = [d["t_streaming"] - d["t_drop"] for d in warm]
    stale = [d for d in drops if not d["t_streaming"] and t_end - d["t_drop"] > LOST_AFTER_S]
    waiting = [d for d in drops if not d["t_streaming"] and d not in stale]
    crashes = {k: d for k, d in watch.deaths.items() if d["cause"] != "stopped"}
    detect = [d["detected"] - d["t"] for d in crashes.values() if d["detected"]]
    reaped = [d["detected"] - d["t"] for d in crashes.values() if d.get("by") == "reaper"]
    streamed = {c["user"]: c["answered"] * FRAME_S for c in clients}
    errors = [abs(billed.get(u, 0.0) - s) for u, s in streamed.items()]
    per_drop = [abs(billed.get(c["user"], 0.0) - streamed[c["user"]]) / max(1, len(c["drops"]))
                for c in clients]
    violations = list(watch.violations.values())
    violations += [{"kind": k, "key": u} for k, us in leaks.items() for u in us]
    return {
        "minutes": minutes, "clients": len(clients),
        "crashes": len(crashes),
        "crash_causes": dict(Counter(d["cause"] for d in crashes.values())),
        "crashes_undetected": len(crashes) - len(detect),
        "detect_s_max": round(max(detect), 3) if detect else None,
        "detected_by": dict(Counter(d.get("by") for d in crashes.values() if d["detected"])),
        "detect_s_max_reaper": round(max(reaped), 3) if reaped else None,
        "drops": len(drops),
        "planned_moves": sum(c.get("moves", 0) for c in clients),
        "sessions_affected": len({(d["session"]) for d in drops}),
        "resumed_fraction": round(len(resumed) / len(drops), 4) if drops else 1.0,
        "resume_s_p50": pct(resumed, 50), "resume_s_p95": pct(resumed, 95),
        "resume_s_max": round(max(resumed), 3) if resumed else None,
        "resumed_within_2s_fraction": (round(sum(r <= 2.0 for r in resumed) / len(drops), 4)
                                       if drops else 1.0),
        "warm_drops": len(warm),
        "resume_s_p95_warm": pct(resumed_warm, 95),
        "resumed_within_2s_fraction_warm": (
            round(sum(r <= 2.0 for r in resumed_warm) / len(warm), 4) if warm else 1.0),
        "lost_sessions": sum(c["refused_resumes"] for c in clients) + len(stale),
        "resumes_refused": sum(c["refused_resumes"] for c in clients),
        "unresumed_at_end": len(waiting),
        "invariant_violations": len(violations),
        "leaked_locks": len(leaks["leaked_lock"]), "leaked_slots": len(leaks["leaked_slot"]),
        "violations": [f"{v['kind']} {v['key']} {v.get('detail', '')}".strip()
                       for v in violations[:10]],
        "streamed_s_total": round(sum(streamed.values()), 2),
        "billed_s_total": round(sum(billed.values()), 2),
        "billing_error_s_max": round(max(errors), 3) if errors else None,
        "billing_error_s_per_drop_max": round(max(per_drop), 3) if per_drop else None,
        "orphans": len(orphans), "orphan_processes": orphans[:10],
        "clients_stopped_clean": sum(c["stopped_clean"] for c in clients),
        "client_errors": dict(sum((Counter(c["errors"]) for c in clients), Counter())),
        "redis_unreachable_checks": watch.redis_errors,
        "faults": faults,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the clients stream")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--crash-rate", type=float, default=0.3, help="CRASH_RATE, per node-minute")
    p.add_argument("--load-s", type=float, default=2.0, help="MODEL_LOAD_SECONDS")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tag = f"{int(time.time()) % 100000}"
    users = [f"chaos-{tag}-{i}" for i in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        log(f"starting the stack: voicectl run in {tmp} (load {args.load_s:g} s, "
            f"CRASH_RATE {args.crash_rate:g}) ...")
        stack = Stack(Path(tmp), args.load_s, args.crash_rate)
        watch = Watch(stack, users)
        faults: list[str] = []
        try:
            t0 = time.time()
            end_at = t0 + 60 * args.minutes
            log(f"{args.clients} clients near {', '.join(LOCATIONS)} stream for {args.minutes:g} "
                "min; faults at "
                + ", ".join(f"{f} {frac * 60 * args.minutes:.0f} s" for frac, f in FAULTS))
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                job = pool.apply_async(run_clients, (f"ws://127.0.0.1:{stack.port}",
                                                     args.clients, tag, end_at))
                pending = list(FAULTS)
                next_progress = t0 + 15
                while not job.ready():
                    now = time.time()
                    if pending and now >= t0 + pending[0][0] * 60 * args.minutes:
                        what = inject(pending[0][1], stack, watch)
                        if what is None:      # nothing to kill yet: try again in a second
                            pending[0] = (pending[0][0] + 1 / (60 * args.minutes), pending[0][1])
                        else:
                            pending.pop(0)
                            faults.append(f"{now - t0:.1f} s: {what}"[:200])
                            log(f"fault at {now - t0:.1f} s: {what}"[:200])
                    if now >= next_progress:
                        live = sum(n.live for n in watch.records.values()
                                   if n.id not in watch.deaths)
                        log(f"{now - t0:.0f}/{60 * args.minutes:.0f} s: {live} live streams, "
                            f"{len(watch.deaths)} nodes gone, "
                            f"{len(watch.violations)} violations")
                        next_progress += 15
                    job.wait(0.2)
                clients = job.get()
            faults += [f"{f}: not injected (no node with streams to kill)" for _, f in pending]
            log("clients stopped; checking locks and slots, waiting for settlement ...")
            time.sleep(3.0)   # "released at once"; a heartbeat's grace for the slot sync
            leaks: dict[str, list[str]] = {"leaked_lock": [], "leaked_slot": []}
            ours = {s for c in clients for s in c["sessions"]}
            try:
                leaks["leaked_lock"] = [u for u in users if watch.state.lock_holder(u)]
                leaks["leaked_slot"] = [s for n in watch.state.node_ids()
                                        if n not in watch.deaths
                                        for s in watch.state.live_sessions(n) if s in ours]
            except redis.RedisError as e:
                log(f"could not read locks and slots ({e})")
            billed = settle(stack.db_url, users)
        finally:
            watch.stop()
            log("stopping voicectl run and looking for orphans ...")
            orphans = stack.stop()
    out = figures(clients, watch, billed, leaks, orphans, faults, args.minutes, end_at)
    report(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
