"""voicectl models (list, push, promote, rollback) and voicectl deploy: see add_parsers."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import PackageError, VoiceError
from provisioner import catalog
from provisioner.state import State, connect
from voicectl.util import default_url, get, redis_url, say, table

COLUMNS = ["name", "version", "state", "canary_percent", "streams_per_gpu", "digest",
           "reason"]


def _state(cfg: Config) -> State:
    return State(connect(redis_url(cfg)))


def cmd_models(args: argparse.Namespace, cfg: Config) -> int:
    data = get(f"{args.url}/api/models")
    if args.json:
        print(json.dumps(data))
        return 0
    print(table([{**row, "digest": str(row.get("digest", ""))[:12]} for row in data], COLUMNS))
    return 0


def cmd_push(args: argparse.Namespace, cfg: Config) -> int:
    if not args.json:
        say(f"checking {args.dir} in a child process (load, one second of test audio) ...")
    try:
        version, check = catalog.push(_state(cfg), cfg, Path(args.dir), time.time(),
                                      args.canary)
    except PackageError as e:
        raise VoiceError(f"push refused, nothing registered: {e}") from None
    out = {"model": version.model, "version": version.version, "digest": version.digest,
           "canary_percent": args.canary or 0, "check": check}
    if args.json:
        print(json.dumps(out))
    elif args.canary:
        say(f"{version.model} v{version.version} ({version.digest[:12]}) is the canary: "
            f"{args.canary}% of new sessions; `voicectl models promote {version.model}` "
            "or `rollback`")
    else:
        say(f"{version.model} v{version.version} ({version.digest[:12]}) is live: new "
            "sessions go to it; older versions drain")
    return 0


def cmd_change(args: argparse.Namespace, cfg: Config) -> int:
    """promote, rollback, or deploy a version."""
    try:
        entry = catalog.change(_state(cfg), cfg, args.model, args.verb, time.time(),
                               version=args.version)
    except ValueError as e:
        raise VoiceError(str(e)) from None
    out: dict[str, Any] = {"model": entry.model, "live": entry.live, "canary": entry.canary,
                           "canary_percent": entry.canary_percent}
    if args.json:
        print(json.dumps(out))
        return 0
    say(f"{entry.model} v{entry.live} is live" + (
        f", v{entry.canary} the canary at {entry.canary_percent}%" if entry.canary else
        "; older versions drain (live streams keep going, nodes stop when empty)"))
    return 0


def add_parsers(sub: Any) -> None:
    mp = sub.add_parser("models", help="list model versions; push, promote, roll back")
    mp.add_argument("--url", default=default_url(), help="the webapp")
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=cmd_models)
    acts = mp.add_subparsers(dest="action")
    push = acts.add_parser("push", help="check a package directory and make it the next "
                           "version (all new sessions, or --canary PERCENT of them)")
    push.add_argument("dir", help="the package: model.toml beside its code and files")
    push.add_argument("--canary", type=int, metavar="PERCENT",
                      help="share of new sessions (1-99) for the new version")
    push.add_argument("--json", action="store_true")
    push.set_defaults(func=cmd_push)
    for verb, text in (("promote", "the canary takes every new session"),
                       ("rollback", "new sessions go back to the last good version")):
        ap = acts.add_parser(verb, help=text)
        ap.add_argument("model", metavar="name")
        ap.add_argument("--json", action="store_true")
        ap.set_defaults(func=cmd_change, verb=verb, version="")
    dep = sub.add_parser("deploy", help="make a pushed version live; the others drain")
    dep.add_argument("model")
    dep.add_argument("--version", required=True)
    dep.add_argument("--json", action="store_true")
    dep.set_defaults(func=cmd_change, verb="deploy")
