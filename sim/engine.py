"""The simulator's engine: the real placement and scaling code, replayed in virtual time.

Simulation rules, mirroring the control plane: a user waits in the queue of their home
pool (model, live version, `placement.home_region`); an arrival claims a slot with
`placement.claim_order` among the regions within the latency budget of that home (as
`placement.candidates` ranks them), and counts in the home pool's arrival averages (as
admit.lua does); without room it waits FIFO and triggers an immediate policy evaluation
(the fixed-buffer baseline waits for its 30 s tick instead). The policy's inputs come
from `inputs.policy_inputs`, the function `fleet.snapshot` calls. A node turning ready,
or a slot freed on a ready node, takes the first waiting users of its pool, then those of
the other homes whose latency budget reaches its region, nearest first (the lobby's
waiting room offers every waiting user the nodes within its budget). Nodes take
boot_s (provider) + load_s to turn ready, in the first of `placement.boot_regions`; a
retargeted one load_s. Spot (`sim.spot`): a spot request may be refused, and the node
boots on-demand instead in the same step; a spot node may be taken back by its provider,
with a notice SPOT_NOTICE_S ahead. At the notice the node drains (takes nobody new) and
its users move, make-before-break, to free slots of ready nodes of their model within
their budget, now or as slots free up (before any waiting user: they have a deadline);
once empty the node stops. Users still on it when the machine goes resume first in line,
as the lobby's `resume` does: those lost audio for more than a second.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from common.config import Config
from common.errors import VoiceError
from provisioner.inputs import Arrivals, policy_inputs
from provisioner.placement import boot_regions, claim_order, near_regions
from provisioner.policy import Decisions, NodeSnap, Policy, PoolKey, ScalingConfig
from provisioner.states import NodeState
from sim.metrics import RunResult
from sim.nodes import Route, SimNode, routes
from sim.spot import SPOT_NOTICE_S, SpotMarket, SpotOffer
from sim.trace import Session

__all__ = ["Route", "SimNode", "SimulationError", "Sim", "routes"]

SAMPLE_S = 60.0             # chart resolution
PROGRESS_EVERY = 16384      # events between progress callbacks
STUCK_S = 7 * 86400.0       # users waiting this long with nothing coming: the policy is stuck

_END, _READY, _ARRIVAL, _TICK, _NOTICE, _GONE = 0, 1, 2, 3, 4, 5   # order at one instant


class SimulationError(VoiceError):
    """A policy broke the rules in simulation: stopped a busy node, or left users waiting."""


class Sim:
    """One run of one policy over one trace. Virtual time only; the policy sees snapshots."""

    def __init__(self, sessions: Sequence[Session], routes: Sequence[Route], config: Config,
                 scaling: ScalingConfig, policy: Policy, result: RunResult, *,
                 tick_s: float, event_driven: bool,
                 progress: Callable[[str, float], None] | None, until_s: float,
                 spot_offers: Mapping[str, SpotOffer], seed: int) -> None:
        self.sessions, self.routes, self.config, self.scaling = sessions, routes, config, scaling
        self.policy, self.result, self.tick_s = policy, result, tick_s
        self.event_driven, self.progress, self.until = event_driven, progress, until_s
        self.market = SpotMarket(spot_offers, seed)
        self.noticed: dict[str, SimNode] = {}   # draining after a notice, users still on
        self.live = {m.name: m.version for m in config.models}
        traced = {s.model for s in sessions}
        self.pool_keys = [PoolKey(m.name, m.version, r.name)
                          for m in config.models if m.name in traced for r in config.regions]
        self.nodes: dict[str, SimNode] = {}
        self.placed: dict[PoolKey, dict[str, SimNode]] = {k: {} for k in self.pool_keys}
        self.queues: dict[PoolKey, deque[int]] = {k: deque() for k in self.pool_keys}
        self.streaming = dict.fromkeys(self.pool_keys, 0)
        # region -> the other homes whose users it may serve (within their budget), nearest first
        near: dict[str, list[tuple[float, str]]] = {}
        for home in config.regions:
            for region, rtt in near_regions(config, home.name).items():
                if region != home.name:
                    near.setdefault(region, []).append((rtt, home.name))
        self.homes_near = {region: [h for _, h in sorted(homes)] for region, homes in near.items()}
        self.arrivals = dict.fromkeys(self.pool_keys, Arrivals())
        self.ends: dict[int, tuple[str, float]] = {}     # session -> (node, end time)
        self.resumed: dict[int, float] = {}              # interrupted session -> time left
        self.price = {p.name: float(p.price_per_hour) for p in config.providers}
        self.spot_price = {p: float(v) for p, v in scaling.spot_price_per_hour_by_provider.items()}
        self.increment = {p.name: float(p.billing_increment_s) for p in config.providers}
        self.heap: list[tuple[float, int, int, str]] = []
        self.seq = self.next_id = 0
        self.waiting = self.ready_slots = self.total_streaming = 0
        self.snaps: tuple[NodeSnap, ...] | None = None   # the nodes as the policy saw them

    # -- events ------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload: str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, payload))

    def run(self, initial: Mapping[PoolKey, int]) -> RunResult:
        sessions, n = self.sessions, len(self.sessions)
        start = math.floor(min(0.0, sessions[0].arrival_s) / SAMPLE_S) * SAMPLE_S
        for key in sorted(initial):      # a fleet that is up before the trace starts
            for _ in range(initial[key]):
                self.boot(key, start - self.scaling.lead_s(key.region), spot=False)
        self.push(start, _TICK, "0")
        ai = ended = events = 0
        now = start
        while ended < n:
            if ai < n and (not self.heap or (sessions[ai].arrival_s, _ARRIVAL) < self.heap[0][:2]):
                now = sessions[ai].arrival_s
                self.arrive(ai, now)
                ai += 1
            else:
                now, kind, _, payload = heapq.heappop(self.heap)
                if kind == _END:
                    node_id, _, idx = payload.partition(":")
                    if self.ends.get(int(idx)) == (node_id, now):   # else: cut by a spot loss
                        self.end(self.nodes[node_id], int(idx), now)
                        ended += 1
                elif kind == _READY:
                    if payload in self.nodes:
                        self.make_ready(self.nodes[payload], now)
                elif kind == _NOTICE:
                    if payload in self.nodes:
                        self.notice(self.nodes[payload], now)
                elif kind == _GONE:
                    if payload in self.nodes:
                        self.gone(self.nodes[payload], now)
                else:
                    self.tick(int(payload), now)
            events += 1
            if events % PROGRESS_EVERY == 0:
                if self.progress:
                    self.progress(self.result.name, now)
                if ai == n and now > sessions[-1].arrival_s + STUCK_S:
                    raise SimulationError(f"{self.result.name}: {self.waiting} users still wait "
                                          f"{STUCK_S / 86400:.0f} days after the last arrival; "
                                          "the policy boots nothing for them (max nodes 0?)")
        for node in list(self.nodes.values()):
            self.stop(node, now)
        return self.result

    def arrive(self, idx: int, now: float) -> None:
        s, route = self.sessions[idx], self.routes[idx]
        version = self.live[s.model]
        key = PoolKey(s.model, version, route.home)
        self.arrivals[key] = self.arrivals[key].counted(now, self.config.arrival_tau_s)
        if not self.claim(idx, key, route, now):
            self.queues[key].append(idx)
            self.waiting += 1
            if self.event_driven:
                self.evaluate(now)

    def claim(self, idx: int, key: PoolKey, route: Route, now: float) -> bool:
        views = [node.view() for region in route.rtt
                 for node in self.placed[PoolKey(key.model, key.version, region)].values()]
        order = claim_order(views, key.model, key.version, route.rtt)
        if order:
            self.start(self.nodes[order[0]], idx, now)
        return bool(order)

    def start(self, node: SimNode, idx: int, now: float) -> None:
        s = self.sessions[idx]
        node.sessions.add(idx)
        node.idle_since = None
        node.touch()
        self.streaming[node.key] += 1
        self.total_streaming += 1
        left = self.resumed.pop(idx, None)
        if left is None and 0 <= s.arrival_s < self.until:
            self.result.waits.append(now - s.arrival_s)
        end = now + (s.duration_s if left is None else left)
        self.ends[idx] = (node.id, end)
        self.push(end, _END, f"{node.id}:{idx}")

    def end(self, node: SimNode, idx: int, now: float) -> None:
        self.leave(node, idx, now)
        del self.ends[idx]
        if node.state is NodeState.READY:
            self.serve_queue(node, now)
        elif not node.sessions and node.id in self.noticed:
            self.stop(node, now)   # drained before its machine goes: give it back now

    def leave(self, node: SimNode, idx: int, now: float) -> None:
        node.sessions.discard(idx)
        if not node.sessions:
            node.idle_since = now
        node.touch()
        self.streaming[node.key] -= 1
        self.total_streaming -= 1

    def notice(self, node: SimNode, now: float) -> None:
        """The provider will take this spot node back in SPOT_NOTICE_S: it drains, and its
        users move to free slots now or as they free up (`serve_queue`)."""
        self.result.interruptions += 1
        if node.state is not NodeState.READY or not node.sessions:   # give it back at once
            self.stop(node, now)
            self.evaluate(now)
            return
        node.state = NodeState.DRAINING
        node.touch()
        self.ready_slots -= node.capacity
        self.result.interrupted_sessions += len(node.sessions)
        self.noticed[node.id] = node
        for idx in sorted(node.sessions):
            route = self.routes[idx]
            k = node.key
            order = claim_order([n.view() for region in route.rtt for n in self.placed.get(
                PoolKey(k.model, k.version, region), {}).values()], k.model, k.version, route.rtt)
            if order:
                self.move(idx, node, self.nodes[order[0]], now)
                self.result.moved_users += 1
        if node.sessions:
            self.push(now + SPOT_NOTICE_S, _GONE, node.id)
        self.evaluate(now)   # the policy sees the capacity gone

    def gone(self, node: SimNode, now: float) -> None:
        """The machine of a noticed spot node goes: the users still on it lost their audio
        and resume first in their queues (the lobby's `resume`)."""
        cut = sorted(node.sessions)
        for idx in cut:
            self.resumed[idx] = self.ends.pop(idx)[1] - now
            self.leave(node, idx, now)
        self.stop(node, now)
        self.result.users_without_audio_over_1s += len(cut)
        for idx in reversed(cut):   # first in line, in their old order
            route = self.routes[idx]
            key = PoolKey(node.key.model, node.key.version, route.home)
            if not self.claim(idx, key, route, now):
                self.queues[key].appendleft(idx)
                self.waiting += 1
        self.evaluate(now)

    def move(self, idx: int, src: SimNode, dst: SimNode, now: float) -> None:
        """A planned move, make-before-break: the session goes on on `dst`, no gap."""
        end = self.ends[idx][1]
        src.sessions.discard(idx)
        if not src.sessions:
            src.idle_since = now
        src.touch()
        dst.sessions.add(idx)
        dst.idle_since = None
        dst.touch()
        self.streaming[src.key] -= 1
        self.streaming[dst.key] += 1
        self.ends[idx] = (dst.id, end)
        self.push(end, _END, f"{dst.id}:{idx}")
        if src.id in self.noticed and not src.sessions:
            self.stop(src, now)

    def make_ready(self, node: SimNode, now: float) -> None:
        node.state = NodeState.READY
        node.ready_at = node.idle_since = now
        node.eta = None
        node.touch()
        self.ready_slots += node.capacity
        self.serve_queue(node, now)

    def serve_queue(self, node: SimNode, now: float) -> None:
        """Fill the free slots of a ready node: users moving off noticed nodes first, then
        the waiting users of its pool, then of the homes near it."""
        k = node.key
        for src in list(self.noticed.values()) if self.noticed else ():
            if (src.key.model, src.key.version) != (k.model, k.version):
                continue
            for idx in sorted(src.sessions):
                if len(node.sessions) >= node.capacity:
                    return
                if node.region in self.routes[idx].rtt:
                    self.move(idx, src, node, now)
                    self.result.moved_users += 1
        for home in (k.region, *self.homes_near.get(node.region, ())):
            queue = self.queues.get(k if home == k.region else PoolKey(k.model, k.version, home))
            while queue and len(node.sessions) < node.capacity:
                self.waiting -= 1
                self.start(node, queue.popleft(), now)
            if len(node.sessions) >= node.capacity:
                return

    # -- policy ------------------------------------------------------------------------
    def tick(self, k: int, now: float) -> None:
        self.evaluate(now)
        self.push(now + self.tick_s, _TICK, str(k + 1))
        if 0 <= now <= self.until and (k * self.tick_s) % SAMPLE_S == 0:
            cap = self.config.streams_per_gpu
            packed = sum(math.ceil(v / cap(k.model)) * cap(k.model)
                         for k, v in self.streaming.items())
            self.result.samples.append((now, self.total_streaming + self.waiting, self.waiting,
                                        self.ready_slots, packed))

    def evaluate(self, now: float) -> None:
        waiting = {key: len(q) for key, q in self.queues.items() if q}
        if self.snaps is None:
            self.snaps = tuple(node.snap() for node in self.nodes.values())
        snapshot = policy_inputs(self.snaps, self.pool_keys, waiting, self.arrivals, now,
                                 self.config.arrival_tau_s)
        self.apply(self.policy(snapshot, now, self.scaling), now)

    def apply(self, decisions: Decisions, now: float) -> None:
        for key in decisions.boot:
            self.boot(key, now, spot=False)
        for key in decisions.spot:
            self.boot(key, now, spot=True)
        for node_id, key in decisions.retarget:
            node = self.nodes[node_id]
            if node.state is not NodeState.READY or node.sessions or node.key.region != key.region:
                raise SimulationError(f"policy retargeted {node} to {key}: not idle and ready "
                                      "in the same region")
            del self.placed[self.place(node)][node.id]
            node.key, node.state, node.eta = key, NodeState.LOADING, now + self.scaling.load_s
            self.placed.setdefault(self.place(node), {})[node.id] = node
            node.ready_at = node.idle_since = None
            node.touch()
            self.ready_slots -= node.capacity
            self.result.retargets += 1
            self.push(node.eta, _READY, node.id)
        for node_id in decisions.drain:
            self.empty(self.nodes[node_id], now, set(decisions.drain))
        for node_id in decisions.stop:
            node = self.nodes[node_id]
            if node.sessions or node.state is not NodeState.READY:
                raise SimulationError(f"policy stopped {node}: it is not idle and ready")
            self.stop(node, now)
            self.result.stops += 1

    def empty(self, node: SimNode, now: float, drained: set[str]) -> None:
        """Consolidation: move the node's sessions to the other ready nodes of its pool that
        are not emptied too (`drained`), fullest first, as planned moves (make-before-break:
        no gap, nothing waits); the node stays, idle, for the policy to stop, keep or reload."""
        if node.state is not NodeState.READY:
            raise SimulationError(f"policy drained {node.id}: it is not ready")
        others = [n for n in self.nodes.values() if n.key == node.key and n.id not in drained
                  and n.state is NodeState.READY]
        for idx in sorted(node.sessions):
            room = [n for n in others if len(n.sessions) < n.capacity]
            if not room:
                raise SimulationError(f"policy drained {node.id}: no room for its users")
            self.move(idx, node, max(room, key=lambda n: (len(n.sessions), n.id)), now)
            self.result.moves += 1
        node.idle_since = now
        node.touch()

    @staticmethod
    def place(node: SimNode) -> PoolKey:
        return PoolKey(node.key.model, node.key.version, node.region)

    def boot(self, key: PoolKey, now: float, spot: bool) -> SimNode:
        """A node for `key`'s queue, in the cheapest region that may serve it (as
        fleet.request_node places it). A refused spot request boots on-demand."""
        where = boot_regions(self.config, key.region)
        region = where[0] if where else self.config.region(key.region)
        assert region is not None, "pools are built from the configured regions"
        provider = self.config.provider(region.provider)
        lead_s = provider.boot_s + self.scaling.load_s
        if spot and self.market.refused(provider.name):
            self.result.spot_refusals += 1
            spot = False
        self.next_id += 1
        self.snaps = None
        node = SimNode(self, f"n{self.next_id:05d}", key, region.name, provider.name,
                       self.config.streams_per_gpu(key.model), NodeState.BOOTING, now,
                       now + lead_s, spot)
        self.nodes[node.id] = node
        self.placed.setdefault(self.place(node), {})[node.id] = node
        self.result.boots += 1
        self.result.peak_nodes = max(self.result.peak_nodes, len(self.nodes))
        self.push(now + lead_s, _READY, node.id)
        if spot:
            self.result.spot_boots += 1
            notice_in_s = self.market.notice_in_s(provider.name)
            if notice_in_s is not None:
                self.push(now + notice_in_s, _NOTICE, node.id)
        return node

    def stop(self, node: SimNode, now: float) -> None:
        self.snaps = None
        self.noticed.pop(node.id, None)
        del self.nodes[node.id]
        del self.placed[self.place(node)][node.id]
        if node.state is NodeState.READY:
            self.ready_slots -= node.capacity
        life = now - node.requested_at
        measured = max(0.0, min(now, self.until) - max(0.0, node.requested_at))
        inc = self.increment.get(node.provider, 1.0)
        billed = math.ceil(life / inc - 1e-9) * inc if life > 0 else 0.0
        price = (self.spot_price.get(node.provider, 0.0) if node.spot
                 else self.price.get(node.provider, 0.0))
        self.result.gpu_s += measured
        if node.spot:
            self.result.spot_gpu_s += measured
        if life > 0:   # the bill of a node that straddles the window: pro rata
            self.result.billed_s += billed * measured / life
            self.result.cost_usd += price * billed / 3600 * (measured / life)
