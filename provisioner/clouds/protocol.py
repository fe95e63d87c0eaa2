"""What one provider module offers, and the names of the tags every machine of ours carries.

A provider module (`ec2`, `gce`, `azure`, `openstack`, `local`) is a `Cloud`: it builds the
libcloud driver for one of the config's regions and speaks its cloud's idiom for user-data,
tags and instance types. Each cloud spells our tags its own way (GCE labels allow no `:`),
but they are these three, set at create and read back by `list_ours` and `node_id`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol

from libcloud.compute.base import Node, NodeDriver

from common.config import Config, Provider, Region

CLUSTER_TAG = "voice:cluster"   # no machine without it is ours: we never touch it
POOL_TAG = "voice:pool"
NODE_TAG = "voice:node"         # the node id; also the machine's name


class Cloud(Protocol):
    """One provider module. `create` raises the cloud's own errors; the seam turns those
    whose words are in `CAPACITY_CODES` into CapacityError."""

    @property
    def CAPACITY_CODES(self) -> Collection[str]: ...   # a module constant, read-only

    def make_driver(self, cfg: Config, provider: Provider, region: Region) -> NodeDriver: ...

    def create(self, driver: NodeDriver, *, name: str, user_data: str,
               tags: Mapping[str, str], instance_type: str, image: str, location: str,
               spot: bool, options: Mapping[str, Any]) -> Node: ...

    def list_ours(self, driver: NodeDriver, cluster: str) -> list[Node]: ...

    def destroy(self, driver: NodeDriver, node: Node) -> bool: ...

    def node_id(self, vm: Node) -> str: ...
