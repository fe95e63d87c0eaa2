"""`voicectl run`: the whole local stack in one command (embedded Redis, SQLite, the local
cloud driver), supervised, and stopped whole by Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import redis

from billing.ledger import Ledger
from common.config import Config, load_config
from provisioner import catalog, clouds
from provisioner.state import State, connect
from provisioner.tasks import BILLING_QUEUE
from voicectl import procs
from voicectl.util import FLOWER_SECRET_FILE, RUN_FILE, say, with_user_secret


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per request
    if not procs.port_free(args.host, args.port):
        say(f"cannot listen on {args.host}:{args.port}: another program uses it; stop it or "
            "pass --port N")
        return 1
    supervisor = procs.Supervisor(say)
    infra: list[Any] = []    # moto: stopped last, with Redis (the nodes' records live there)
    clouds_init: list[Any] = []   # --moto: what boots moto's instances here
    procs.private_dir(procs.ROOT / "var")   # billing, logs, secrets, the append-only file
    logs = procs.private_dir(procs.ROOT / "var" / "logs")
    try:
        redis_url = cfg.redis_url
        if redis_url:
            say(f"using Redis at {procs.redacted(redis_url)}")
        else:
            say(f"starting embedded Redis (REDIS_URL is unset; data in {args.data}) ...")
            port = procs.free_port()
            urls: list[str] = []

            def redis_server() -> Any:   # on 127.0.0.1, its password in args.data (0600)
                url, proc = procs.start_redis(port, args.data)
                urls.append(url)
                return proc
            supervisor.add("redis", redis_server)
            redis_url = urls[0]
            cfg = cfg.with_overrides(redis_url=redis_url)
            say(f"Redis ready at {procs.redacted(redis_url)}")
        if cfg.public_url == Config.public_url:   # VOICE_PUBLIC_URL unset: nodes join us here
            cfg = cfg.with_overrides(public_url=f"http://{args.host}:{args.port}")
        cfg = with_user_secret(cfg)
        dev_env: dict[str, str] = {}
        if args.moto:
            dev_env = _start_moto(cfg, infra, clouds_init, logs)
            cfg = with_user_secret(load_config({**os.environ, **dev_env}).with_overrides(
                redis_url=redis_url, public_url=cfg.public_url))
        state = State(connect(redis_url))
        catalog.seed(state, cfg)
        say(f"billing database: {cfg.database_url}")
        Ledger.open(cfg.database_url).engine.dispose()   # migrated before the others check
        env = {**os.environ, "REDIS_URL": redis_url, "TICKET_SECRET": cfg.ticket_secret,
               "USER_TOKEN_SECRET": cfg.user_token_secret,
               "DATABASE_URL": cfg.database_url,
               "MODEL_LOAD_SECONDS": str(cfg.model_load_s), "CRASH_RATE": str(cfg.crash_rate),
               "VOICE_PUBLIC_URL": cfg.public_url,
               "FLOWER_BASIC_AUTH": f"voice:{procs.secret_file(FLOWER_SECRET_FILE)}",
               **dev_env}
        celery = [sys.executable, "-m", "celery", "-A", "provisioner.worker"]
        say(f"starting the Celery worker with beat (log: {logs / 'celery.log'}) ...")
        supervisor.add("celery worker", lambda: procs.spawn(
            celery + ["worker", "-B", "-E", "--pool", "threads", "--concurrency", "8",
                      "-Q", "celery", "-n", "provision@%h",
                      "--loglevel", "INFO", "--schedule", str(logs / "beat-schedule")],
            env=env, log=logs / "celery.log"))
        say(f"starting the billing worker (log: {logs / 'billing.log'}) ...")
        supervisor.add("billing worker", lambda: procs.spawn(   # a hung database waits here
            celery + ["worker", "-E", "--pool", "threads", "--concurrency", "2",
                      "-Q", BILLING_QUEUE, "-n", "billing@%h", "--loglevel", "INFO"],
            env=env, log=logs / "billing.log"))
        say(f"starting Flower on http://{args.host}:{args.flower_port} (user voice, password "
            f"in {FLOWER_SECRET_FILE}) ...")
        supervisor.add("flower", lambda: procs.spawn(
            celery + ["flower", f"--port={args.flower_port}", f"--address={args.host}"],
            env=env, log=logs / "flower.log"))
        say(f"starting the webapp on http://{args.host}:{args.port} (gunicorn, gevent) ...")
        supervisor.add("webapp", lambda: procs.spawn(   # as deployed: a greenlet a socket
            procs.webapp_command(args.host, args.port, workers=2), env=env,
            log=logs / "webapp.log"))   # two: a flood of refusals fills one core
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        # Ctrl-C stops everything even when we were started in the background (`make run &`),
        # where the shell leaves SIGINT ignored and Python then keeps it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        deadline = time.monotonic() + 60
        while procs.port_free(args.host, args.port):   # until the webapp listens
            if time.monotonic() > deadline:
                raise RuntimeError(f"the webapp did not start; see {logs / 'webapp.log'}")
            time.sleep(0.1)
        fd = os.open(RUN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # Redis password
        with os.fdopen(fd, "w") as f:
            json.dump({"redis_url": cfg.redis_url, "url": f"http://{args.host}:{args.port}",
                       **({"ec2_endpoint": dev_env["VOICE_EC2_ENDPOINT"]} if dev_env else {})},
                      f)   # ec2_endpoint: `voicectl kill-node --spot-notice` finds moto
        threading.Thread(target=_report_fleet, args=(state,), daemon=True).start()
        say(f"open http://{args.host}:{args.port}  (Ctrl-C stops everything)")
        say(f"nodes boot on demand (model load {cfg.model_load_s:g} s); node logs in {logs}")
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        # The Celery worker first, so no tick boots a node after we destroyed them all;
        # Redis (and moto) last, since the drivers read their VMs from them.
        say("stopping the webapp, the Celery workers and Flower ...")
        supervisor.stop(["webapp", "celery worker", "billing worker", "flower"])
        say("destroying every node we started ...")
        _destroy_nodes(cfg)
        for init in clouds_init:
            init.stop()
        supervisor.stop(["redis"])
        procs.stop(infra)
        RUN_FILE.unlink(missing_ok=True)
        say("stopped")


def _start_moto(cfg: Config, infra: list[Any], inits: list[Any], logs: Any
                ) -> dict[str, str]:
    """Dev mode: a local EC2 API (moto) for every ec2 provider, and a "cloud-init" that
    boots its instances from their user-data as local processes."""
    from voicectl import devcloud

    say("starting a local EC2 API (moto) for the ec2 providers ...")
    endpoint, proc = devcloud.start_moto()
    infra.append(proc)
    for region in clouds.machine_regions(cfg):
        if cfg.provider(region.provider).driver == "ec2":
            where = region.provider_region or region.name
            inits.append(devcloud.CloudInit(endpoint, where, log_dir=logs / "vms",
                                            cluster=cfg.cluster,
                                            env=devcloud.minimal_env()).start())
            say(f"EC2 {where} at {endpoint}: instances run their user-data here")
    return {"VOICE_EC2_ENDPOINT": endpoint,
            "AWS_ACCESS_KEY_ID": cfg.aws_access_key_id or "testing",
            "AWS_SECRET_ACCESS_KEY": cfg.aws_secret_access_key or "testing"}


def _destroy_nodes(cfg: Config) -> None:
    if not cfg.redis_url:
        return
    try:
        for region in clouds.machine_regions(cfg):
            for vm in clouds.list_ours(cfg, region):
                clouds.destroy(cfg, region, vm)
    except Exception as e:  # process boundary: shutting down, say what was left
        say(f"could not destroy every node ({e}); they exit on their own within "
            "15 s of Redis going away")


def _report_fleet(state: State) -> None:
    """Tell the person at the terminal when nodes come and go."""
    seen: dict[str, str] = {}
    while True:
        try:
            now = {n.id: f"{n.state.value}" for n in state.nodes()}
        except redis.RedisError:
            return   # shutting down
        for node_id, st in now.items():
            if seen.get(node_id) != st and st in ("ready", "draining", "booting"):
                n = state.node(node_id)
                if n:
                    say(f"node {n.id} {st}: {n.model} v{n.version} in {n.region} {n.url}")
        for node_id in set(seen) - set(now):
            say(f"node {node_id} stopped")
        seen = now
        time.sleep(0.5)
