"""Which model versions serve, and how packages become versions (push, seed, fail).

Adapters around the pure `versions` module: read the model's entry, decide, write it back
by compare-and-set. A package's code never runs in this process: the push check runs it in
a child process (`python -m worker_node.package check DIR`), nodes run it to serve.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from functools import partial
from pathlib import Path

from common.config import Config
from common.errors import PackageError
from common.package import pack
from provisioner import versions
from provisioner.packages import PackageStore, open_store
from provisioner.state import State
from provisioner.versions import Entry, Version, VersionState

log = logging.getLogger("provisioner.catalog")

CHECK_TIMEOUT_S = 300.0   # loading a real model's weights takes a while


def store(cfg: Config) -> PackageStore:
    return open_store(cfg.package_store, cfg.aws_access_key_id, cfg.aws_secret_access_key)


def seed(state: State, cfg: Config) -> None:
    """The config's packages become version 1 of models the state does not know yet (a
    push since wins). The operator ships these with the project: no check process."""
    packages = store(cfg)
    for model in cfg.models:
        if state.model_entry(model.name) is not None:
            continue
        manifest, data, digest = pack(model.package)
        packages.put(digest, data)
        state.change_model(model.name, lambda e, m=manifest, d=digest: e or versions.push(
            None, m.name, d, m.streams_per_gpu, m.description, 0.0, 0.0)[0])


def check(directory: Path) -> dict[str, object]:
    """Run the package's check in a child process; PackageError with its own message."""
    try:
        done = subprocess.run([sys.executable, "-m", "worker_node.package", "check",
                               str(directory)], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PackageError(f"{directory}: the check did not finish within "
                           f"{CHECK_TIMEOUT_S:.0f} s (loading or one second of audio)") from None
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, object] = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise PackageError(f"{directory}: the check crashed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:] or 'no output'}") from None
    if not result.get("ok"):
        raise PackageError(f"{directory} refused: {result.get('error')}")
    return result


def push(state: State, cfg: Config, directory: Path, now: float,
         canary_percent: int | None = None) -> tuple[Version, dict[str, object]]:
    """Check, store and register a package as its model's next version."""
    if canary_percent is not None and not 1 <= canary_percent <= 99:
        raise PackageError(f"--canary {canary_percent} must be a share of 1-99 percent "
                           "(without --canary the version takes every new session)")
    result = check(directory)
    manifest, data, digest = pack(directory)
    store(cfg).put(digest, data)
    pushed: list[Version] = []

    def change(entry: Entry | None) -> Entry:
        new, version = versions.push(entry, manifest.name, digest, manifest.streams_per_gpu,
                                     manifest.description, now, cfg.drain_limit_s,
                                     canary_percent)
        pushed[:] = [version]
        return new
    state.change_model(manifest.name, change)
    state.wake_lobbies()
    return pushed[0], result


def change(state: State, cfg: Config, name: str, verb: str, now: float,
           version: str = "") -> Entry:
    """promote, rollback or deploy (a version by number); ValueError says why not."""
    if state.model_entry(name) is None:
        raise ValueError(f"unknown model {name!r}; known: {sorted(state.model_entries())}")
    steps = {"promote": partial(versions.promote, now=now, drain_s=cfg.drain_limit_s),
             "rollback": partial(versions.rollback, now=now, drain_s=cfg.drain_limit_s),
             "deploy": partial(versions.deploy, version=version, now=now,
                               drain_s=cfg.drain_limit_s)}
    entry = state.change_model(name, lambda e: steps[verb](e))
    state.wake_lobbies()
    return entry


def serving(state: State) -> list[Version]:
    """Every version new sessions may go to (live and canary), for the fleet's pools."""
    return [v for e in state.model_entries().values() for v in e.serving()]


def for_session(state: State, name: str, resume: str | None = None) -> Version | None:
    """The version a new session (or a resume of one on `resume`) is placed on."""
    entry = state.model_entry(name)
    if entry is None or not entry.live:
        return None
    if resume is not None and resume in (entry.live, entry.canary):
        return entry.versions[resume]
    return entry.for_new_session(state.next_session_count(name) if entry.canary else 1)


ORDER = {VersionState.LIVE: 0, VersionState.CANARY: 1, VersionState.DRAINING: 2,
         VersionState.FAILED: 3}


def listing(state: State, now: float) -> list[dict[str, object]]:
    """Every model's versions that serve, drain or failed (GET /api/models, voicectl models)."""
    out: list[dict[str, object]] = []
    for name, entry in state.model_entries().items():
        rows = [(entry.state(v.version, now), v) for v in entry.versions.values()]
        for st, v in sorted(((st, v) for st, v in rows if st in ORDER),
                            key=lambda r: (ORDER[r[0]], -int(r[1].version))):
            out.append({"name": name, "version": v.version, "state": st.value,
                        "digest": v.digest, "streams_per_gpu": v.streams_per_gpu,
                        "canary_percent": entry.canary_percent if st is VersionState.CANARY
                        else 0, "description": v.description, "pushed_at": v.pushed_at,
                        **({"drain_deadline": v.deadline} if st is VersionState.DRAINING
                           else {}), **({"reason": v.failed} if v.failed else {})})
    return out


def version(state: State, name: str, number: str) -> Version | None:
    entry = state.model_entry(name)
    return entry.versions.get(number) if entry else None


def roll_back_failures(state: State, cfg: Config, now: float,
                       only: set[str] | None = None) -> list[str]:
    """Automatic rollback: a canary (or a newly live version with a good one before it)
    whose nodes fail to load it or whose streams fail far more often than the last good
    version's (versions.failure) is marked failed; new sessions go to the good version and
    its users move there. Returns "model vN: reason" for each."""
    out = []
    entries = state.model_entries() if only is None else {
        n: e for n in only if (e := state.model_entry(n)) is not None}
    for name, entry in entries.items():
        bad = entry.canary or entry.live
        good = entry.live if entry.canary else next(
            (v for v in reversed(entry.history) if v != bad
             and v in entry.versions and not entry.versions[v].failed), None)
        if good is None:
            continue
        reason = versions.failure(state.version_health(name, bad),
                                  state.version_health(name, good))
        if not reason:
            continue

        def fail(e: Entry | None, bad: str = bad, reason: str = reason) -> Entry:
            assert e is not None
            if (e.canary or e.live) != bad:   # changed meanwhile: leave it
                return e
            return versions.rollback(e, now, cfg.drain_limit_s, failed=reason)
        state.change_model(name, fail)
        state.count("voice_model_rollbacks", model=name)
        log.warning("model %s v%s failed (%s): rolled back to v%s", name, bad, reason, good)
        out.append(f"{name} v{bad}: {reason}")
    if out:
        state.wake_lobbies()
    return out
