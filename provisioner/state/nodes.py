"""Nodes: their records, orders (drain, retire), and single-flight tokens."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import NODES, flight_key, node_key, placed_key, slots_key
from provisioner.state.records import ROW_FIELDS, NodeRecord, _record, row_record
from provisioner.states import NodeState

ROWS_PER_CALL = 100   # nodes per fleet.lua call: Redis is held ~3 ms at a time
FLEET_ARGS = (ROW_FIELDS.index("state") + 1, ROW_FIELDS.index("model") + 1, *ROW_FIELDS)


class Nodes(StateBase):
    """State's verbs on nodes (a mixin: `State` composes one per noun)."""

    def add_node(self, fields: Mapping[str, Any]) -> None:
        """The control plane asks for a node: record it before any VM exists."""
        node_id = str(fields["id"])
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(NODES, node_id)
        pipe.hset(node_key(node_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.execute()

    def set_node(self, node_id: str, **fields: Any) -> None:
        self.r.hset(node_key(node_id), mapping={k: str(v) for k, v in fields.items()})

    def heartbeat(self, fields: Mapping[str, Any], now: float) -> None:
        """A node reports its state (read its control flags first with node_flags)."""
        node_id = str(fields["id"])
        mapping = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        mapping["last_seen"] = repr(now)
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(NODES, node_id)
        pipe.hset(node_key(node_id), mapping=mapping)
        pipe.execute()

    def node_flags(self, node_id: str) -> dict[str, str]:
        """The control plane's orders for a node: drain_deadline, retarget."""
        flags = self.r.hmget(node_key(node_id), "drain_deadline", "retarget")
        return {"drain_deadline": flags[0] or "", "retarget": flags[1] or ""}

    def touch_idle(self, rec: NodeRecord, now: float) -> float | None:
        """When the node last became empty (tracked for scale-down grace), None if busy."""
        if rec.state is NodeState.READY and rec.sessions == 0:
            if rec.idle_since is None:
                self.r.hset(node_key(rec.id), "idle_since", repr(now))
                return now
            return rec.idle_since
        if rec.idle_since is not None:
            self.r.hdel(node_key(rec.id), "idle_since")
        return None

    def node_ids(self) -> list[str]:
        return sorted(self.r.smembers(NODES))

    def nodes(self) -> list[NodeRecord]:
        return [row_record(row) for _, row in self.node_rows()]

    def node_rows(self) -> list[tuple[str, str]]:
        """Every node as (model, packed row): see row_record. One script call per
        ROWS_PER_CALL nodes: a pipeline of three commands per node cost the lobby 100 ms of
        Python per read of a thousand nodes, and one call for all of them held Redis for
        30 ms while everyone else's commands waited. A reader unpacks only the rows it needs."""
        ids = sorted(self.r.smembers(NODES))
        rows: list[tuple[str, str]] = []
        for at in range(0, len(ids), ROWS_PER_CALL):
            keys = [key for node_id in ids[at:at + ROWS_PER_CALL]
                    for key in (node_key(node_id), slots_key(node_id))]
            raw = self._fleet(keys=keys, args=FLEET_ARGS)
            rows += zip(raw[::2], raw[1::2], strict=True)
        return rows

    def node(self, node_id: str) -> NodeRecord | None:
        pipe = self.r.pipeline(transaction=False)   # one round trip (every heartbeat reads it)
        pipe.hgetall(node_key(node_id))
        pipe.zcard(slots_key(node_id))
        pipe.zcount(slots_key(node_id), "+inf", "+inf")
        h, taken, live = pipe.execute()
        if not h or "state" not in h:
            return None
        return _record(h, int(taken), int(live))

    def node_suspect(self, node_id: str) -> str:
        return self.r.hget(node_key(node_id), "suspect") or ""

    def mark_suspect(self, node_id: str, why: str, now: float) -> None:
        """Drain a node at once for `why` (it lies, or its model hangs): its users move, it
        takes nobody new, and `voicectl nodes` says why. An operator stops or keeps it."""
        self.r.hset(node_key(node_id), mapping={"suspect": why, "drain_deadline": now})

    def forget_node(self, node_id: str) -> None:
        """Remove a node and its slots (it stopped or died)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(NODES, node_id)
        pipe.delete(node_key(node_id), slots_key(node_id), placed_key(node_id))
        pipe.execute()

    def retire(self, node_id: str, now: float) -> bool:
        """Atomically mark an empty node as stopping; False if it has sessions."""
        return bool(self._retire(keys=[node_key(node_id), slots_key(node_id)], args=[now]))

    def drain(self, node_id: str, deadline: float, consolidate: bool = False) -> None:
        """No new sessions; its streams move by `deadline`. `consolidate`: into the node's
        own pool, after which it serves again (an old version's node stops instead)."""
        self.r.hset(node_key(node_id), mapping={"drain_deadline": repr(deadline),
                                                **({"consolidating": "1"} if consolidate
                                                   else {})})

    def undrain(self, node_id: str) -> None:
        self.r.hdel(node_key(node_id), "drain_deadline", "consolidating", "drain_reason")

    def interrupt(self, node_id: str, at: float, deadline: float) -> None:
        """Its provider takes the node back at `at` (a spot notice): drained for good
        (reason `spot`, never undrained nor consolidated), its streams move by `deadline`."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(node_key(node_id), mapping={"drain_deadline": repr(deadline),
                                              "drain_reason": "spot",
                                              "interrupt_at": repr(at)})
        pipe.hdel(node_key(node_id), "consolidating")
        pipe.execute()

    def single_flight(self, name: str, ttl_s: float) -> str | None:
        """A token if this caller may run `name` now (nobody else holds it), else None."""
        token = uuid.uuid4().hex
        ok = self.r.set(flight_key(name), token, nx=True, px=int(ttl_s * 1000))
        return token if ok else None

    def renew_flight(self, name: str, token: str, ttl_s: float) -> bool:
        """Extend a single_flight's lease, if it is still ours (False: it was lost)."""
        return bool(self._renew(keys=[flight_key(name)], args=[token, int(ttl_s * 1000)]))

    def land(self, name: str, token: str) -> None:
        """Release a single_flight, if it is still ours."""
        self._land(keys=[flight_key(name)], args=[token])
