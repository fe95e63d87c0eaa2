"""voicectl models: list versions; push a package, promote or roll back its canary; deploy.

    voicectl models [--json]                      every model's live, canary, draining, failed
    voicectl models push DIR [--canary PERCENT]   check, store and register the next version
    voicectl models promote NAME                  the canary takes every new session
    voicectl models rollback NAME                 new sessions go back to the last good one
    voicectl deploy NAME --version V              make a pushed version live again
"""

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
from provisioner.versions import Entry
from voicectl.util import default_url, get, redis_url, say, table

COLUMNS = ["name", "version", "state", "canary_percent", "streams_per_gpu", "digest",
           "reason"]


def _state(cfg: Config) -> State:
    return State(connect(redis_url(cfg)))


def cmd_models(args: argparse.Namespace, cfg: Config) -> int:
    action = getattr(args, "action", None)
    if action == "push":
        return _push(args, cfg)
    if action in ("promote", "rollback"):
        return _change(args, cfg, action)
    data = get(f"{args.url}/api/models")
    if args.json:
        print(json.dumps(data))
        return 0
    print(table([{**row, "digest": str(row.get("digest", ""))[:12]} for row in data], COLUMNS))
    return 0


def _push(args: argparse.Namespace, cfg: Config) -> int:
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


def _change(args: argparse.Namespace, cfg: Config, verb: str) -> int:
    try:
        entry = catalog.change(_state(cfg), cfg, args.name, verb, time.time())
    except ValueError as e:
        raise VoiceError(str(e)) from None
    _say_entry(args, entry)
    return 0


def cmd_deploy(args: argparse.Namespace, cfg: Config) -> int:
    try:
        entry = catalog.change(_state(cfg), cfg, args.model, "deploy", time.time(),
                               version=args.version)
    except ValueError as e:
        raise VoiceError(str(e)) from None
    _say_entry(args, entry)
    return 0


def _say_entry(args: argparse.Namespace, entry: Entry) -> None:
    out: dict[str, Any] = {"model": entry.model, "live": entry.live, "canary": entry.canary,
                           "canary_percent": entry.canary_percent}
    if args.json:
        print(json.dumps(out))
        return
    say(f"{entry.model} v{entry.live} is live" + (
        f", v{entry.canary} the canary at {entry.canary_percent}%" if entry.canary else
        "; older versions drain (live streams keep going, nodes stop when empty)"))


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
    for verb, text in (("promote", "the canary takes every new session"),
                       ("rollback", "new sessions go back to the last good version")):
        ap = acts.add_parser(verb, help=text)
        ap.add_argument("name")
        ap.add_argument("--json", action="store_true")
    dep = sub.add_parser("deploy", help="make a pushed version live; the others drain")
    dep.add_argument("model")
    dep.add_argument("--version", required=True)
    dep.add_argument("--json", action="store_true")
    dep.set_defaults(func=cmd_deploy)
