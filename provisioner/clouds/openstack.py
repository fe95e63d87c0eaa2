"""OpenStack (Nova) through libcloud's OpenStack_2_NodeDriver: one driver per service region
(the region's `provider_region`, e.g. "RegionOne"), the flavor by its name ("g1.large"),
the image by its id, user-data as the server's user_data (cloud-init runs it), our tags as
server metadata. Spot servers are not offered.

Nova lets two servers share a name, so a create first looks for a server of ours with this
node id: a retried create returns it instead of booting (and billing) a second one.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from libcloud.compute.base import Node, NodeDriver, NodeImage
from libcloud.compute.drivers.openstack import (
    OpenStack_2_NodeDriver,
    OpenStackNetwork,
    OpenStackSecurityGroup,
)

from common.config import Config, Provider, Region
from common.errors import ConfigError
from provisioner.clouds.protocol import CLUSTER_TAG, NODE_TAG

# Nova's words for a quota reached, or no hypervisor with room for the flavor.
CAPACITY_CODES = frozenset({"Quota exceeded", "No valid host", "InsufficientCapacity"})


def make_driver(cfg: Config, provider: Provider, region: Region) -> NodeDriver:
    """Options: `auth_url` (Keystone), `user`, `password`, `tenant` (the project); optional
    `domain` ("Default") and `auth_version` ("3.x_password")."""
    o = provider.options
    return _driver(str(o["user"]), str(o["password"]), str(o["auth_url"]),
                   str(o.get("auth_version", "3.x_password")), str(o["tenant"]),
                   str(o.get("domain", "Default")), region.provider_region or None)


@lru_cache(maxsize=32)
def _driver(user: str, password: str, auth_url: str, auth_version: str, tenant: str,
            domain: str, service_region: str | None) -> NodeDriver:
    return OpenStack_2_NodeDriver(  # type: ignore[no-untyped-call]
        user, password, ex_force_auth_url=auth_url, ex_force_auth_version=auth_version,
        ex_tenant_name=tenant, ex_domain_name=domain, ex_force_service_region=service_region)


def create(driver: NodeDriver, *, name: str, user_data: str, tags: Mapping[str, str],
           instance_type: str, image: str, location: str, spot: bool,
           options: Mapping[str, Any]) -> Node:
    """A server of flavor `instance_type` from image id `image`; optional options:
    `networks` (ids), `security_groups` (names: one must open node_port), `key_name`,
    `availability_zone`."""
    for node in list_ours(driver, tags.get(CLUSTER_TAG, "")):
        if node_id(node) == name:
            return node
    flavors = {s.name: s for s in driver.list_sizes()}
    if instance_type not in flavors:
        raise ConfigError(f"OpenStack has no flavor {instance_type!r} in {location}; set the "
                          f"provider's instance_type to one of {sorted(flavors)}")
    nova: Any = driver   # libcloud's OpenStack arguments are untyped
    made: Node = nova.create_node(
        name=name, size=flavors[instance_type], image=NodeImage(image, image, driver),
        ex_userdata=user_data, ex_metadata=dict(tags), ex_keyname=options.get("key_name"),
        networks=[OpenStackNetwork(n, n, None, driver)  # type: ignore[no-untyped-call]
                  for n in options.get("networks", ())],
        ex_security_groups=[OpenStackSecurityGroup(None, None, g, "", driver)  # type: ignore[no-untyped-call]
                            for g in options.get("security_groups", ())],
        ex_availability_zone=options.get("availability_zone"))
    return made


def list_ours(driver: NodeDriver, cluster: str) -> list[Node]:
    """Servers in the driver's region whose metadata names our cluster."""
    return [n for n in driver.list_nodes()
            if (n.extra.get("metadata") or {}).get(CLUSTER_TAG) == cluster]


def destroy(driver: NodeDriver, node: Node) -> bool:
    return bool(driver.destroy_node(node))


def node_id(vm: Node) -> str:
    return str((vm.extra.get("metadata") or {}).get(NODE_TAG) or vm.name)
