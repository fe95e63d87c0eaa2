"""Run one worker node: `python -m worker_node --model miku --region us-west [--port 0]`.

The node publishes its URL, state and load progress in Redis by heartbeat.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid

from werkzeug.serving import make_server

from common.config import Model, load_config
from common.errors import ConfigError
from provisioner.state import State, connect
from worker_node.agent import Agent
from worker_node.runtime import NodeRuntime
from worker_node.server import create_app
from worker_node.shifter import warm_up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="worker_node", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--version", help="model version (default: the configured one)")
    p.add_argument("--region", required=True)
    p.add_argument("--node-id", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--semitones", type=float, help="pitch shift (default: the configured one)")
    p.add_argument("--boot-s", type=float, default=0.0,
                   help="wait this long first: stands for the VM booting")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node %(message)s")
    try:
        cfg = load_config()
    except ConfigError as e:
        print(f"worker_node: {e}", file=sys.stderr)
        return 2
    model, region = cfg.model(args.model), cfg.region(args.region)
    if model is None and args.version and args.semitones is not None:
        model = Model(args.model, args.version, args.semitones)   # a deployed version
    if model is None or region is None:
        print(f"worker_node: unknown model {args.model!r} or region {args.region!r}; "
              f"known models {[m.name for m in cfg.models]}, regions "
              f"{[r.name for r in cfg.regions]}", file=sys.stderr)
        return 2
    if cfg.redis_url is None:
        print("worker_node: REDIS_URL is not set; the node must heartbeat into the "
              "control plane's Redis", file=sys.stderr)
        return 2
    provider = cfg.provider(region.provider)
    time.sleep(args.boot_s)
    node = NodeRuntime(id=args.node_id or f"n-{uuid.uuid4().hex[:10]}", model=model.name,
                       version=args.version or model.version, region=region.name,
                       provider=provider.name,
                       semitones=model.semitones if args.semitones is None else args.semitones,
                       capacity=cfg.node_capacity, load_s=cfg.model_load_s)
    agent = Agent(node, State(connect(cfg.redis_url)), cfg.heartbeat_interval_s,
                  provider.price_per_hour, cfg.crash_rate, lock_ttl_s=cfg.heartbeat_timeout_s,
                  warm_up=warm_up)
    app = create_app(node, cfg.ticket_secret, on_open=agent.on_open, on_close=agent.on_close,
                     admit=agent.admit)
    server = make_server(args.host, args.port, app, threaded=True)
    node.url = f"ws://{args.host}:{server.server_port}/ws"
    agent.start()
    threading.Thread(target=node.load, args=(warm_up, agent.poke), name="load",
                     daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    logging.info("%s serving %s v%s in %s at %s (loading %.1f s)", node.id, node.model,
                 node.version, node.region, node.url, cfg.model_load_s)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
