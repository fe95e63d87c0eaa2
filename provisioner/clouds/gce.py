"""Google Compute Engine through libcloud's GCENodeDriver: one driver per zone (the region's
`provider_region`, e.g. "us-central1-a"), the machine type and image by name, user-data as
the `startup-script` metadata item, our tags as labels, `spot` as a preemptible VM.

GCE labels hold only lowercase letters, digits, `_` and `-` (at most 63), so the tag
`voice:cluster` is the label `voice-cluster` and values are lowered, any other character
becoming `_`: the cluster is compared in that form, so clusters that differ only there look
like one. Instance names are unique in a zone: a retried create gets the first try's node.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from libcloud.common.google import ResourceExistsError
from libcloud.compute.base import Node, NodeDriver
from libcloud.compute.drivers.gce import GCENodeDriver

from common.config import Config, Provider, Region
from provisioner.clouds.protocol import CLUSTER_TAG, NODE_TAG

# The zone has no such machine now, or the project is out of quota (CPUs, GPUs, addresses).
CAPACITY_CODES = frozenset({"ZONE_RESOURCE_POOL_EXHAUSTED",
                            "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "QUOTA_EXCEEDED"})

_NOT_LABEL = re.compile(r"[^a-z0-9_-]")


def label(text: str) -> str:
    """`text` as a GCE label key or value: `voice:pool` -> `voice-pool`, `a|1|B` -> `a_1_b`."""
    return _NOT_LABEL.sub("_", text.lower().replace(":", "-"))[:63]


def labels(tags: Mapping[str, str]) -> dict[str, str]:
    return {label(k): label(v) for k, v in tags.items()}


def make_driver(cfg: Config, provider: Provider, region: Region) -> NodeDriver:
    """Options: `project`, `user_id` (the service account's email), `key` (its JSON key
    file); optional `auth_type` and `credential_file` (where libcloud caches the token)."""
    o = provider.options
    return _driver(str(o["user_id"]), str(o["key"]), str(o["project"]),
                   region.provider_region or region.name, o.get("auth_type"),
                   o.get("credential_file"))


@lru_cache(maxsize=32)
def _driver(user_id: str, key: str, project: str, zone: str, auth_type: str | None,
            credential_file: str | None) -> NodeDriver:
    return GCENodeDriver(user_id, key, project=project, datacenter=zone,  # type: ignore[no-untyped-call]
                         auth_type=auth_type, credential_file=credential_file)


def create(driver: NodeDriver, *, name: str, user_data: str, tags: Mapping[str, str],
           instance_type: str, image: str, location: str, spot: bool,
           options: Mapping[str, Any]) -> Node:
    """An instance of machine type `instance_type` (e.g. "g2-standard-4", which has its
    GPU) from `image` (a name, family member or URL) on the option `network` ("default")."""
    gce: Any = driver   # libcloud's GCE arguments are untyped
    try:
        made: Node = gce.create_node(name, instance_type, image, location=location,
                                     ex_network=options.get("network", "default"),
                                     ex_metadata={"startup-script": user_data},
                                     ex_labels=labels(tags), ex_preemptible=spot)
    except ResourceExistsError:   # a retry: the first try made it
        made = gce.ex_get_node(name, location)
    return made


def list_ours(driver: NodeDriver, cluster: str) -> list[Node]:
    """Instances in the driver's zone labelled with our cluster."""
    ours = label(cluster)
    return [n for n in driver.list_nodes()
            if (n.extra.get("labels") or {}).get(label(CLUSTER_TAG)) == ours]


def destroy(driver: NodeDriver, node: Node) -> bool:
    return bool(driver.destroy_node(node))   # the boot disk goes with it (auto-delete)


def node_id(vm: Node) -> str:
    return str((vm.extra.get("labels") or {}).get(label(NODE_TAG)) or vm.name)
