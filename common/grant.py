"""What a node gets when it joins: the one message both sides of the join share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Grant:
    """The node's identity and orders from the control plane (POST /api/nodes/join)."""

    node_id: str
    credential: str          # authenticates its heartbeats; revocable
    ticket_key: str          # verifies tickets for this node alone
    model: str
    version: str
    digest: str              # the model package to fetch (GET /api/nodes/package/DIGEST)
    capacity: int            # streams at once (the package's streams_per_gpu)
    region: str
    provider: str
    heartbeat_interval_s: float
    model_load_s: float      # the stand-in model's load time
    crash_rate: float        # the stand-in model's crash chance per minute

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Grant:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})
