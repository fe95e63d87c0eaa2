"""voicectl: run the local stack and inspect the fleet. Tables by default, JSON with --json."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from werkzeug.serving import make_server

from common.config import Config, load_config
from common.errors import VoiceError
from provisioner.state import State, connect
from voicectl import procs
from webapp.app import create_app


def say(msg: str) -> None:
    print(f"voicectl: {msg}", flush=True)


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    if not procs.port_free(args.host, args.port):
        say(f"cannot listen on {args.host}:{args.port}: another program uses it; stop it or "
            "pass --port N")
        return 1
    children = []
    try:
        if cfg.redis_url:
            say(f"using Redis at {cfg.redis_url}")
        else:
            say("starting embedded Redis (REDIS_URL is unset) ...")
            url, proc = procs.start_redis()
            children.append(proc)
            cfg = cfg.with_overrides(redis_url=url)
            say(f"Redis ready at {url}")
        assert cfg.redis_url is not None
        state = State(connect(cfg.redis_url))
        env = {**os.environ, "REDIS_URL": cfg.redis_url, "TICKET_SECRET": cfg.ticket_secret,
               "MODEL_LOAD_SECONDS": str(cfg.model_load_s), "CRASH_RATE": str(cfg.crash_rate)}
        region = args.region or cfg.regions[0].name
        for m in cfg.models:
            say(f"starting a node for {m.name} v{m.version} in {region} "
                f"(model load {cfg.model_load_s:g} s) ...")
            children.append(procs.start_node(m.name, region, env, inherit=True))
        server = make_server(args.host, args.port, create_app(cfg, state), threaded=True)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        threading.Thread(target=_report_ready, args=(state, len(cfg.models)), daemon=True).start()
        say(f"open http://{args.host}:{args.port}  (Ctrl-C stops everything)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        say(f"stopping {len(children)} child processes ...")
        procs.stop(children)
        say("stopped")


def _report_ready(state: State, expected: int) -> None:
    """Tell the person at the terminal when each node has loaded its model."""
    seen: set[str] = set()
    while len(seen) < expected:
        for n in state.nodes():
            if n.state.value == "ready" and n.id not in seen:
                seen.add(n.id)
                say(f"node {n.id} ready: {n.model} v{n.version} in {n.region} at {n.url}")
        time.sleep(0.5)


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except (urllib.error.URLError, OSError) as e:
        raise VoiceError(f"cannot reach the webapp at {url} ({e}); is `voicectl run` "
                         "running? pass --url if it listens elsewhere") from None


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def cmd_nodes(args: argparse.Namespace, cfg: Config) -> int:
    data = _get(f"{args.url}/api/cluster")
    if args.json:
        print(json.dumps(data))
        return 0
    print(table(data["nodes"], ["id", "region", "model", "version", "state", "sessions",
                                "capacity", "price_per_hour", "url"]))
    if data["queues"]:
        print("\n" + table(data["queues"], ["model", "region", "waiting"]))
    print(f"\n{len(data['nodes'])} nodes, ${data['cost_per_hour']:.2f}/hour")
    return 0


def cmd_models(args: argparse.Namespace, cfg: Config) -> int:
    data = _get(f"{args.url}/api/models")
    print(json.dumps(data) if args.json else table(data, ["name", "version", "state"]))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voicectl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole local stack (Redis, nodes, webapp)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--region", help="region of the launch nodes (default: the first)")
    run.set_defaults(func=cmd_run)
    for name, func, text in [("nodes", cmd_nodes, "list the fleet and the queues"),
                             ("models", cmd_models, "list models and versions")]:
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--url", default="http://127.0.0.1:8000", help="the webapp")
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args, load_config()))
    except VoiceError as e:
        print(f"voicectl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
