"""voicectl: run the local stack and inspect the fleet. Tables by default, JSON with --json."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from common.config import Config, load_config
from common.errors import VoiceError
from common.identity import mint_token
from provisioner.state import State, connect
from voicectl import models, procs
from voicectl.util import (
    RUN_FILE,
    USER_SECRET_FILE,
    default_url,
    get,
    redis_url,
    say,
    table,
    with_user_secret,
)


def cmd_nodes(args: argparse.Namespace, cfg: Config) -> int:
    data = get(f"{args.url}/api/cluster")
    if args.json:
        print(json.dumps(data))
        return 0
    for n in data["nodes"]:   # why it drains, or what is wrong with it
        clock = n.get("clock_offset_s")
        n["note"] = n.get("suspect") or n.get("drain_reason") or (
            f"clock {-clock:+.0f} s off (serves on ours; fix NTP)" if clock else "")
    print(table(data["nodes"], ["id", "region", "model", "version", "state", "sessions",
                                "capacity", "market", "price_per_hour", "url",
                                "reports_dropped", "note"]))
    if data["queues"]:
        print("\n" + table(data["queues"], ["model", "region", "waiting"]))
    print(f"\n{len(data['nodes'])} nodes, ${data['cost_per_hour']:.2f}/hour")
    return 0


def _kill(cfg: Config, node_ids: list[str], as_json: bool) -> int:
    from provisioner import clouds  # libcloud: only where needed (the CLI starts fast)

    cfg = cfg.with_overrides(redis_url=redis_url(cfg))
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
    from billing.ledger import Ledger, day_totals
    from webapp.requests import BadRequest, parse_since

    if args.rejected:   # what settlement skipped as malformed (a lying or broken node)
        rejected = State(connect(redis_url(cfg))).rejected()
        print(json.dumps(rejected) if args.json else "\n".join(rejected) or "none")
        return 0
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
    from billing import schema
    from billing.tables import open_db

    engine = open_db(cfg.database_url)
    before = schema.upgrade(engine)
    where = engine.url.render_as_string(hide_password=True)
    say(f"billing database {where}: schema {before or 'empty'} -> {schema.head()}")
    engine.dispose()
    return 0


def cmd_kill_node(args: argparse.Namespace, cfg: Config) -> int:
    if args.spot_notice:
        return _spot_notice(cfg, args.node_id, args.notice_s, args.json)
    return _kill(cfg, [args.node_id], args.json)


def _spot_notice(cfg: Config, node_id: str, notice_s: float, as_json: bool) -> int:
    """Play the provider taking a spot node back in `notice_s` (see docs/faults.md)."""
    from provisioner import clouds, spot
    from voicectl import devcloud

    if not 0 < notice_s <= 3600:
        raise VoiceError(f"--notice-s {notice_s:g} is not 0-3600 seconds (EC2 gives 120)")
    cfg = _with_dev_cloud(cfg.with_overrides(redis_url=redis_url(cfg)))
    state = State(connect(cfg.redis_url or ""))
    rec = state.node(node_id)
    if rec is None:
        raise VoiceError(f"no node {node_id!r}; `voicectl nodes` lists them")
    if not rec.spot:
        raise VoiceError(f"node {node_id} is an on-demand machine: its provider never takes "
                         f"it back; `voicectl kill-node {node_id}` crashes it instead")
    provider, region = cfg.provider(rec.provider), cfg.region(rec.region)
    at = time.time() + notice_s
    if provider.driver == "ec2" and region is not None and provider.options.get("endpoint"):
        vm = next((vm for vm in clouds.list_ours(cfg, region)
                   if clouds.node_id_of(vm) == node_id), None)
        if vm is None:
            raise VoiceError(f"no EC2 instance of ours for node {node_id} in {rec.region}; "
                             "it may be gone already (`voicectl nodes`)")
        refused: tuple[type[Exception], ...] = (ValueError, *clouds.PROVIDER_ERRORS)
        try:
            devcloud.send_spot_notice(clouds.driver_for(cfg, region), vm, at)
        except refused as e:
            raise VoiceError(f"the dev cloud refused the notice for node {node_id}: {e}") from e
        how = "its instance metadata serves the notice; the node tells the control plane"
    elif provider.driver == "local":   # no metadata service: the provider's event instead
        spot.noticed(state, node_id, at, time.time())
        how = "the local cloud told the control plane, as a provider's interruption event"
    elif provider.driver == "ec2":
        raise VoiceError(f"node {node_id} runs on AWS itself: interrupt it with AWS FIS "
                         "(aws:ec2:send-spot-instance-interruptions); the dev cloud "
                         "(`voicectl run --moto`) plays it here")
    else:
        raise VoiceError(f"node {node_id} runs on {provider.driver!r}: no stand-in plays its "
                         "spot notices here (ec2 on moto and local do)")
    if as_json:
        print(json.dumps({"noticed": node_id, "at": at}))
    else:
        say(f"spot notice: node {node_id} is taken back in {notice_s:g} s; {how}, which "
            "moves its users to other nodes first")
    return 0


def _with_dev_cloud(cfg: Config) -> Config:
    """The config as a running `voicectl run --moto` sees it: its ec2 providers without an
    `endpoint` of their own on that run's moto (var/run.json), with its fake keys."""
    try:
        endpoint = str(json.loads(RUN_FILE.read_text()).get("ec2_endpoint") or "")
    except (OSError, ValueError):
        endpoint = ""
    if not endpoint:
        return cfg
    providers = tuple(replace(p, options={**p.options, "endpoint": endpoint})
                      if p.driver == "ec2" and not p.options.get("endpoint") else p
                      for p in cfg.providers)
    return cfg.with_overrides(providers=providers,
                              aws_access_key_id=cfg.aws_access_key_id or "testing",
                              aws_secret_access_key=cfg.aws_secret_access_key or "testing")


def cmd_kill_region(args: argparse.Namespace, cfg: Config) -> int:
    from provisioner.outages import REGION_COOLOFF_S

    if cfg.region(args.region) is None:
        raise VoiceError(f"unknown region {args.region!r}; known: "
                         f"{[r.name for r in cfg.regions]}")
    state = State(connect(redis_url(cfg)))
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

    state = State(connect(redis_url(cfg)))
    token = membership.byo_token(state, cfg, args.region, args.model, args.ttl)
    url = cfg.public_url if cfg.public_url != Config.public_url else default_url()
    if args.json:
        print(json.dumps({"token": token, "join": url, "region": args.region}))
    else:
        print(token)
        say(f"on the machine (with this project installed), valid {args.ttl:.0f} s, once:\n"
            f"  voicectl node --join {url} --token {token} --public-url ws://HOST:PORT")
    return 0


def cmd_user_token(args: argparse.Namespace, cfg: Config) -> int:
    cfg = with_user_secret(cfg)
    now = time.time()
    token = mint_token(args.user, cfg.user_token_secret, now=now, ttl_s=args.ttl)
    url = cfg.public_url if cfg.public_url != Config.public_url else default_url()
    if args.json:
        print(json.dumps({"user": args.user, "token": token, "expires_at": now + args.ttl}))
    else:
        print(token)
        signed = ("USER_TOKEN_SECRET" if os.environ.get("USER_TOKEN_SECRET")
                  else f"the local stack's secret ({USER_SECRET_FILE})")
        say(f"user {args.user}, valid {args.ttl:.0f} s, signed with {signed}: open "
            f"{url}/?token={token} or pass token=... to /ws/session and /api/usage")
    return 0


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from voicectl.run import cmd_run as run  # the whole stack's imports: only to run it

    return run(args, cfg)


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
    sp = sub.add_parser("nodes", help="list the fleet and the queues")
    sp.add_argument("--url", default=default_url(), help="the webapp")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_nodes)
    models.add_parsers(sub)
    us = sub.add_parser("usage", help="seconds streamed per user and day (billing database)")
    us.add_argument("--user")
    us.add_argument("--since", help="ISO date or time, UTC")
    us.add_argument("--rejected", action="store_true",
                    help="the usage counters settlement skipped as malformed, newest first")
    fmt = us.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--json", action="store_true")
    us.set_defaults(func=cmd_usage)
    mg = sub.add_parser("migrate", help="bring the billing database (DATABASE_URL) to this "
                        "code's schema; deployments run it before the webapp starts")
    mg.set_defaults(func=cmd_migrate)
    sub.add_parser("simulate", help="run the autoscaler over a trace in virtual time "
                   "(see voicectl simulate --help)", add_help=False)
    kn = sub.add_parser("kill-node", help="crash one node (SIGKILL) to test recovery, or "
                        "take a spot node back with a notice (--spot-notice)")
    kn.add_argument("node_id")
    kn.add_argument("--spot-notice", action="store_true", help="a spot interruption instead "
                    "of a crash: the provider takes the node back after --notice-s, and its "
                    "users move to other nodes first (ec2 on moto, or local)")
    kn.add_argument("--notice-s", type=float, default=120.0,
                    help="seconds from the notice to the interruption (EC2: 120)")
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
        from sim.run import main as simulate

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
