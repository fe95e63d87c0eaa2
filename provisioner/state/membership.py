"""Membership: join tokens, credentials, heartbeats, and constrained regions."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

import redis

from provisioner.state.base import StateBase
from provisioner.state.keys import (
    BEAT_PATH,
    BEAT_PATH_LAST,
    CONSTRAINED,
    NODES,
    USAGE_DIRTY,
    cred_hash_key,
    cred_key,
    digest,
    join_key,
    lock_key,
    node_key,
    placed_key,
    slots_key,
    usage_key,
)
from provisioner.state.records import Beat, Orders

# What a node may report is what the control plane placed on it (beat.lua): usage counts
# only from a minute before a session's placement to a minute ahead of now (node clocks
# drift); a node whose dropped reports reach LIE_LIMIT is drained and marked suspect.
USAGE_SLACK_S = 60
LIE_LIMIT = 20


class Membership(StateBase):
    """State's verbs on membership: join tokens, credentials, heartbeats (a mixin)."""

    def stamp_beat_path(self, now: float, gap_s: float) -> None:
        """A webapp that takes heartbeats is up: the stamp keeps since when one has been,
        and starts again after a gap longer than `gap_s`."""
        pipe = self.r.pipeline()   # MULTI: the two never see each other half done
        pipe.set(BEAT_PATH, repr(now), nx=True, px=int(gap_s * 1000))
        pipe.pexpire(BEAT_PATH, int(gap_s * 1000))
        pipe.set(BEAT_PATH_LAST, repr(now))
        pipe.execute()

    def beat_path(self) -> tuple[float | None, float | None]:
        """(since when heartbeats have been taken without a gap, when last): None, None
        if no webapp ever stamped; since None while none does."""
        since, last = self.r.mget(BEAT_PATH, BEAT_PATH_LAST)
        return (float(since) if since else None, float(last) if last else None)

    def mint_join(self, grant: Mapping[str, str], ttl_s: float) -> str:
        """A one-time join token for a node we boot ({"node": id}) or an own machine
        ({"byo": region, "model": name}); only its hash is stored."""
        token = "j-" + secrets.token_urlsafe(24)
        self.r.set(join_key(token), json.dumps(dict(grant)), px=int(ttl_s * 1000))
        return token

    def node_join_token(self, node_id: str) -> str | None:
        """The join token minted for a node we boot, while it has not joined."""
        return self.r.hget(node_key(node_id), "join_token") or None

    def redeem_join(self, token: str) -> dict[str, str] | None:
        """The token's grant, once: a second use (or an expired token) gets None."""
        raw = self.r.getdel(join_key(token))
        return json.loads(raw) if raw else None

    def enroll(self, node_id: str, fields: Mapping[str, Any]) -> str:
        """Give a node its credential (a fresh one revokes the old) and record `fields`."""
        credential = "c-" + secrets.token_urlsafe(32)
        old = self.r.hget(node_key(node_id), "cred")
        pipe = self.r.pipeline(transaction=True)
        if old:
            pipe.delete(cred_hash_key(old))
        pipe.set(cred_key(credential), node_id)
        pipe.sadd(NODES, node_id)
        pipe.hset(node_key(node_id), mapping={**{k: str(v) for k, v in fields.items()},
                                              "cred": digest(credential)})
        pipe.hdel(node_key(node_id), "join_token")
        pipe.execute()
        return credential

    def node_for_credential(self, credential: str) -> str | None:
        return self.r.get(cred_key(credential)) if credential else None

    def revoke(self, node_id: str) -> bool:
        """The node's credential stops working at once; True if it had one."""
        old = self.r.hget(node_key(node_id), "cred")
        if not old:
            return False
        self.r.delete(cred_hash_key(old))
        self.r.hdel(node_key(node_id), "cred")
        return True

    def beats(self, beats: list[tuple[str, str, Beat]], now: float,
              lock_ttl_s: float) -> list[Orders | bool | Exception]:
        """Record heartbeats (node id, credential, report), each atomically (beat.lua), in
        one round trip. Per beat: the node's orders if `credential` is the node's; False if
        the node is forgotten, True if the credential is not its own; the script's error
        for a report it could not take (that node's alone)."""
        calls = [_beat_call(node_id, credential, beat, now, lock_ttl_s)
                 for node_id, credential, beat in beats]

        def run() -> list[Any]:   # EVALSHA itself: a script in a pipeline costs a round trip
            pipe = self.r.pipeline(transaction=False)   # of SCRIPT EXISTS every time
            for keys, args in calls:
                pipe.evalsha(self._beat.sha, len(keys), *keys, *args)
            # each report its own outcome: one node's bad report fails that node only
            return pipe.execute(raise_on_error=False)

        results = run()
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
            self.r.script_load(self._beat.script)   # a new or flushed Redis: load it, once
            results = run()
        out: list[Orders | bool | Exception] = []
        for res in results:
            if isinstance(res, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
                raise res   # Redis itself failed: every report, not one node's
            if isinstance(res, Exception):
                out.append(res)
            elif int(res[0]) != 1:
                out.append(int(res[0]) == -1)
            else:
                out.append(Orders(float(res[1]) if res[1] else None, res[2] or None,
                                  tuple(res[5:]), was=res[3], dropped=int(res[4])))
        return out

    def mark_constrained(self, region: str, until: float, reason: str) -> None:
        self.r.hset(CONSTRAINED, region, json.dumps({"until": until, "reason": reason}))

    def constrained(self, now: float) -> dict[str, str]:
        """Regions whose provider refused to create nodes lately -> the refusal."""
        out = {}
        for region, raw in self.r.hgetall(CONSTRAINED).items():
            entry = json.loads(raw)
            if float(entry["until"]) > now:
                out[region] = str(entry["reason"])
        return out


def _beat_call(node_id: str, credential: str, beat: Beat, now: float,
               lock_ttl_s: float) -> tuple[list[str], list[Any]]:
    """beat.lua's KEYS and ARGV for one report (the script's header says what they hold)."""
    keys = [node_key(node_id), slots_key(node_id), USAGE_DIRTY]
    keys += [lock_key(user) for user, _, _ in beat.streams]
    keys += [usage_key(minute) for minute, _, _ in beat.usage]
    keys += [lock_key(user) for user, _ in beat.closed]
    keys.append(placed_key(node_id))
    args: list[Any] = [now, beat.state, beat.progress,
                       "" if beat.eta_ready is None else beat.eta_ready,
                       "" if beat.ready_at is None else beat.ready_at, lock_ttl_s,
                       node_id, beat.serving, len(beat.streams), len(beat.usage)]
    for user, session, fence in beat.streams:
        args += [user, session, fence]
    for minute, field, seconds in beat.usage:
        args += [field, repr(seconds), minute]
    for user, session in beat.closed:
        args += [user, session]
    args += [round(beat.clock_offset_s, 1), USAGE_SLACK_S, LIE_LIMIT, digest(credential)]
    return keys, args
