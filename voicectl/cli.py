"""voicectl: run the local stack and inspect the fleet. Tables by default, JSON with --json."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from billing import schema
from billing.ledger import Ledger, day_totals
from billing.tables import open_db
from common.config import NAME_RE, Config, load_config
from common.errors import VoiceError
from common.identity import mint_token
from provisioner import clouds, tasks
from provisioner.fleet import REGION_COOLOFF_S
from provisioner.state import State, connect
from voicectl import procs
from webapp import serving
from webapp.app import before_serving, create_app
from webapp.requests import BadRequest, parse_since


def say(msg: str) -> None:
    print(f"voicectl: {msg}", flush=True)


RUN_FILE = procs.ROOT / "var" / "run.json"
USER_SECRET_FILE = procs.ROOT / "var" / "user-token-secret"


def local_user_secret(path: Path = USER_SECRET_FILE) -> str:
    """The local stack's USER_TOKEN_SECRET, made once and kept in `path` (mode 0600): page
    cookies outlive a restart, and `voicectl user-token` in another terminal mints tokens
    the running stack accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _with_user_secret(cfg: Config) -> Config:
    """USER_TOKEN_SECRET from the environment, else the local stack's own."""
    if os.environ.get("USER_TOKEN_SECRET"):
        return cfg
    return cfg.with_overrides(user_token_secret=local_user_secret())


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per request
    if not procs.port_free(args.host, args.port):
        say(f"cannot listen on {args.host}:{args.port}: another program uses it; stop it or "
            "pass --port N")
        return 1
    supervisor = procs.Supervisor(say)
    infra: list[Any] = []    # moto: stopped last, with Redis (the nodes' records live there)
    clouds_init: list[Any] = []   # --moto: what boots moto's instances here
    logs = procs.ROOT / "var" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        if cfg.redis_url:
            say(f"using Redis at {cfg.redis_url}")
        else:
            say(f"starting embedded Redis (REDIS_URL is unset; data in {args.data}) ...")
            port = procs.free_port()
            supervisor.add("redis", lambda: procs.start_redis(port, args.data)[1])
            cfg = cfg.with_overrides(redis_url=f"redis://127.0.0.1:{port}/0")
            say(f"Redis ready at {cfg.redis_url}")
        assert cfg.redis_url is not None
        if cfg.public_url == Config.public_url:   # VOICE_PUBLIC_URL unset: nodes join us here
            cfg = cfg.with_overrides(public_url=f"http://{args.host}:{args.port}")
        cfg = _with_user_secret(cfg)
        dev_env: dict[str, str] = {}
        if args.moto:
            dev_env = _start_moto(cfg, infra, clouds_init, logs)
            cfg = load_config({**os.environ, **dev_env}).with_overrides(
                redis_url=cfg.redis_url, public_url=cfg.public_url)
        state = State(connect(cfg.redis_url))
        state.seed_models((m.name, m.version, m.semitones) for m in cfg.models)
        say(f"billing database: {cfg.database_url}")
        ledger = Ledger.open(cfg.database_url)   # migrated before the worker checks it
        env = {**os.environ, "REDIS_URL": cfg.redis_url, "TICKET_SECRET": cfg.ticket_secret,
               "USER_TOKEN_SECRET": cfg.user_token_secret,
               "DATABASE_URL": cfg.database_url,
               "MODEL_LOAD_SECONDS": str(cfg.model_load_s), "CRASH_RATE": str(cfg.crash_rate),
               "VOICE_PUBLIC_URL": cfg.public_url, "FLOWER_UNAUTHENTICATED_API": "true",
               **dev_env}
        celery = [sys.executable, "-m", "celery", "-A", "provisioner.worker"]
        say(f"starting the Celery worker with beat (log: {logs / 'celery.log'}) ...")
        supervisor.add("celery worker", lambda: procs.spawn(
            celery + ["worker", "-B", "-E", "--pool", "threads", "--concurrency", "8",
                      "--loglevel", "INFO", "--schedule", str(logs / "beat-schedule")],
            env=env, log=logs / "celery.log"))
        say(f"starting Flower on http://{args.host}:{args.flower_port} ...")
        supervisor.add("flower", lambda: procs.spawn(
            celery + ["flower", f"--port={args.flower_port}", f"--address={args.host}"],
            env=env, log=logs / "flower.log"))
        app = tasks.make_celery(cfg)
        server = serving.make_server(   # werkzeug's, with a gate on floods of connections
            args.host, args.port,
            create_app(cfg, state, lambda: app.send_task("provisioner.scale"), ledger), cfg)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        # Ctrl-C stops everything even when we were started in the background (`make run &`),
        # where the shell leaves SIGINT ignored and Python then keeps it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        RUN_FILE.write_text(json.dumps({"redis_url": cfg.redis_url,
                                        "url": f"http://{args.host}:{args.port}"}))
        threading.Thread(target=_report_fleet, args=(state,), daemon=True).start()
        say(f"open http://{args.host}:{args.port}  (Ctrl-C stops everything)")
        say(f"nodes boot on demand (model load {cfg.model_load_s:g} s); node logs in {logs}")
        before_serving(cfg, state)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        # The Celery worker first, so no tick boots a node after we destroyed them all;
        # Redis (and moto) last, since the drivers read their VMs from them.
        say("stopping the Celery worker and Flower ...")
        supervisor.stop(["celery worker", "flower"])
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


def _redis_url(cfg: Config) -> str:
    if cfg.redis_url:
        return cfg.redis_url
    if RUN_FILE.exists():
        return str(json.loads(RUN_FILE.read_text())["redis_url"])
    raise VoiceError("no REDIS_URL and no running `voicectl run` (var/run.json); start the "
                     "stack or set REDIS_URL")


def _default_url() -> str:
    if RUN_FILE.exists():
        return str(json.loads(RUN_FILE.read_text())["url"])
    return "http://127.0.0.1:8000"


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
    print(json.dumps(data) if args.json else table(data, ["name", "version", "state",
                                                          "semitones"]))
    return 0


def cmd_deploy(args: argparse.Namespace, cfg: Config) -> int:
    for what, value in (("model", args.model), ("version", args.version)):
        if not NAME_RE.match(value):
            raise VoiceError(f"{what} {value!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    state = State(connect(_redis_url(cfg)))
    current = state.model(args.model)
    semitones = args.semitones
    if semitones is None:
        if current is None:
            raise VoiceError(f"model {args.model!r} is new: pass --semitones N")
        semitones = current.semitones
    drain_s = cfg.drain_limit_s if args.drain_limit is None else args.drain_limit
    live = state.deploy(args.model, args.version, semitones, time.time() + drain_s)
    out = {"model": live.name, "version": live.version, "semitones": live.semitones,
           "draining": list(live.draining)}
    if args.json:
        print(json.dumps(out))
    else:
        say(f"{live.name} v{live.version} is live: new sessions go to it")
        for d in live.draining:
            say(f"{live.name} v{d['version']} drains: live streams keep going, nodes stop when "
                f"empty or within {drain_s:.0f} s")
    return 0


def _kill(cfg: Config, node_ids: list[str], as_json: bool) -> int:
    cfg = cfg.with_overrides(redis_url=_redis_url(cfg))
    vms = {vm.name: vm for region in clouds.machine_regions(cfg)
           if cfg.provider(region.provider).driver == "local"
           for vm in clouds.list_ours(cfg, region)}
    killed = []
    for node_id in node_ids:
        vm = vms.get(node_id)
        if vm is None:
            raise VoiceError(f"no VM for node {node_id!r}; `voicectl nodes` lists them")
        pid = int(vm.extra.get("pid", 0))
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)   # a crash, not a stop: the reaper must notice
            except ProcessLookupError:
                pass
        killed.append(node_id)
    if as_json:
        print(json.dumps({"killed": killed}))
    else:
        for node_id in killed:
            say(f"killed node {node_id}; the control plane reaps it within "
                f"{cfg.heartbeat_timeout_s:.0f} s and its users resume elsewhere")
    return 0


def cmd_usage(args: argparse.Namespace, cfg: Config) -> int:
    try:
        since = parse_since(args.since)
    except BadRequest as e:
        raise VoiceError(str(e)) from None
    rows = day_totals(Ledger.open(cfg.database_url).usage(args.user, since))
    cols = ["user", "day", "minutes", "seconds"]
    if args.json:
        print(json.dumps(rows))
    elif args.csv:
        out = csv.DictWriter(sys.stdout, fieldnames=cols)
        out.writeheader()
        out.writerows(rows)
    elif rows:
        print(table(rows, cols))
    else:
        say("no usage recorded" + (f" for user {args.user}" if args.user else ""))
    return 0


def cmd_migrate(args: argparse.Namespace, cfg: Config) -> int:
    engine = open_db(cfg.database_url)
    before = schema.upgrade(engine)
    where = engine.url.render_as_string(hide_password=True)
    say(f"billing database {where}: schema {before or 'empty'} -> {schema.head()}")
    engine.dispose()
    return 0


def cmd_kill_node(args: argparse.Namespace, cfg: Config) -> int:
    return _kill(cfg, [args.node_id], args.json)


def cmd_kill_region(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.region(args.region) is None:
        raise VoiceError(f"unknown region {args.region!r}; known: "
                         f"{[r.name for r in cfg.regions]}")
    state = State(connect(_redis_url(cfg)))
    ids = [n.id for n in state.nodes() if n.region == args.region]
    vm_ids = {vm["name"] for vm in state.vms()}
    killed = [i for i in ids if i in vm_ids]
    # An outage, as a provider would report it: placement, waiting lobbies and the
    # autoscaler avoid the region until the cool-off ends or a new node serves there.
    # Marked first: while its machines die, the scaler must not boot replacements there.
    state.mark_region_down(args.region, time.time() + REGION_COOLOFF_S)
    rc = _kill(cfg, killed, args.json)
    now = time.time()
    for node_id in killed:
        state.report_lost(node_id, now)
    state.wake_lobbies()
    return rc


def cmd_byo_token(args: argparse.Namespace, cfg: Config) -> int:
    from provisioner import membership

    state = State(connect(_redis_url(cfg)))
    token = membership.byo_token(state, cfg, args.region, args.model, args.ttl)
    url = cfg.public_url if cfg.public_url != Config.public_url else _default_url()
    if args.json:
        print(json.dumps({"token": token, "join": url, "region": args.region}))
    else:
        print(token)
        say(f"on the machine (with this project installed), valid {args.ttl:.0f} s, once:\n"
            f"  voicectl node --join {url} --token {token} --public-url ws://HOST:PORT")
    return 0


def cmd_user_token(args: argparse.Namespace, cfg: Config) -> int:
    cfg = _with_user_secret(cfg)
    now = time.time()
    token = mint_token(args.user, cfg.user_token_secret, now=now, ttl_s=args.ttl)
    url = cfg.public_url if cfg.public_url != Config.public_url else _default_url()
    if args.json:
        print(json.dumps({"user": args.user, "token": token, "expires_at": now + args.ttl}))
    else:
        print(token)
        signed = ("USER_TOKEN_SECRET" if os.environ.get("USER_TOKEN_SECRET")
                  else f"the local stack's secret ({USER_SECRET_FILE})")
        say(f"user {args.user}, valid {args.ttl:.0f} s, signed with {signed}: open "
            f"{url}/?token={token} or pass token=... to /ws/session and /api/usage")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voicectl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole local stack (Redis, nodes, webapp)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--region", help="region of the launch nodes (default: the first)")
    run.set_defaults(func=cmd_run)
    run.add_argument("--flower-port", type=int, default=5555)
    run.add_argument("--moto", action="store_true", help="dev mode: ec2 providers use a local "
                     "EC2 API (moto) whose instances boot here from their user-data")
    run.add_argument("--data", type=Path, default=procs.ROOT / "var" / "redis",
                     help="where the embedded Redis keeps its append-only file (default "
                     "var/redis): a restart comes back with the fleet, sessions and usage")
    for name, func, text in [("nodes", cmd_nodes, "list the fleet and the queues"),
                             ("models", cmd_models, "list models and versions")]:
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--url", default=_default_url(), help="the webapp")
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=func)
    dep = sub.add_parser("deploy", help="make a model version live; older versions drain")
    dep.add_argument("model")
    dep.add_argument("--version", required=True)
    dep.add_argument("--semitones", type=float, help="pitch shift (default: unchanged)")
    dep.add_argument("--drain-limit", type=float, help="seconds old nodes may keep streaming")
    dep.add_argument("--json", action="store_true")
    dep.set_defaults(func=cmd_deploy)
    us = sub.add_parser("usage", help="seconds streamed per user and day (billing database)")
    us.add_argument("--user")
    us.add_argument("--since", help="ISO date or time, UTC")
    fmt = us.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--json", action="store_true")
    us.set_defaults(func=cmd_usage)
    mg = sub.add_parser("migrate", help="bring the billing database (DATABASE_URL) to this "
                        "code's schema; deployments run it before the webapp starts")
    mg.set_defaults(func=cmd_migrate)
    sub.add_parser("simulate", help="run the autoscaler over a trace in virtual time "
                   "(see voicectl simulate --help)", add_help=False)
    kn = sub.add_parser("kill-node", help="crash one node (SIGKILL) to test recovery")
    kn.add_argument("node_id")
    kn.add_argument("--json", action="store_true")
    kn.set_defaults(func=cmd_kill_node)
    kr = sub.add_parser("kill-region", help="crash every node of a region")
    kr.add_argument("region")
    kr.add_argument("--json", action="store_true")
    kr.set_defaults(func=cmd_kill_region)
    sub.add_parser("node", help="run a GPU node that joins the control plane "
                   "(see voicectl node --help)", add_help=False)
    bt = sub.add_parser("byo-token", help="a one-time join token for your own GPU machine")
    bt.add_argument("--region", required=True, help="a region whose provider has driver byo")
    bt.add_argument("--model", help="the model it serves first (default: the first)")
    bt.add_argument("--ttl", type=float, default=3600.0, help="seconds the token stays valid")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=cmd_byo_token)
    ut = sub.add_parser("user-token", help="a signed, expiring token for one user (?token=), "
                        "signed with USER_TOKEN_SECRET (local runs: var/user-token-secret)")
    ut.add_argument("user", help="the user id: 1-64 of A-Z a-z 0-9 _ . -")
    ut.add_argument("--ttl", type=float, default=3600.0, help="seconds the token stays valid")
    ut.add_argument("--json", action="store_true")
    ut.set_defaults(func=cmd_user_token)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:   # the simulator owns its flags (voicectl simulate --help)
        from provisioner.simulate import main as simulate

        return simulate(argv[1:])
    if argv[:1] == ["node"]:       # a node needs no config: the control plane gives it all
        from worker_node.__main__ import main as node

        return node(argv[1:])
    args = parser().parse_args(argv)
    try:
        return int(args.func(args, load_config()))
    except VoiceError as e:
        print(f"voicectl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
