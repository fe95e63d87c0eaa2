"""Azure Resource Manager through libcloud's AzureNodeDriver: one driver per location (the
region's `provider_region`, e.g. "eastus"), the VM size by its name ("Standard_NC4as_T4_v3"),
user-data as the VM's customData (cloud-init runs it), our tags as Azure tags.

Every VM goes into the option `resource_group`, with a NIC of its own on the virtual
network `network` (subnet `subnet`, default "default") and a managed OS disk; destroying it
removes the NIC and the disk too. A VM's name is unique in its resource group and a create
is a PUT, so a retried create returns the first try's VM. Azure's spot VMs are not offered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from libcloud.common.azure_arm import AzureResourceManagementConnection
from libcloud.compute.base import Node, NodeAuthSSHKey, NodeDriver, NodeLocation, NodeSize
from libcloud.compute.drivers.azure_arm import AzureImage, AzureNodeDriver

from common.config import Config, Provider, Region
from provisioner.clouds.protocol import CLUSTER_TAG, NODE_TAG

# Azure's error codes for no such size here now, or a quota (cores per family or region).
CAPACITY_CODES = frozenset({"SkuNotAvailable", "OperationNotAllowed", "QuotaExceeded",
                            "AllocationFailed", "ZonalAllocationFailed"})


class _Connection(AzureResourceManagementConnection):
    """libcloud 3.9 base64-encodes customData into bytes, which its JSON encoder refuses
    (apache/libcloud#1893): they are ASCII, written as such."""

    def encode_data(self, data: Any) -> str:
        return json.dumps(data, default=lambda b: b.decode("ascii"))


class _Driver(AzureNodeDriver):
    connectionCls = _Connection


def make_driver(cfg: Config, provider: Provider, region: Region) -> NodeDriver:
    """Options: `tenant_id`, `subscription_id`, `key` (the application's client id) and
    `secret` (its client secret)."""
    o = provider.options
    return _driver(str(o["tenant_id"]), str(o["subscription_id"]), str(o["key"]),
                   str(o["secret"]), region.provider_region or region.name)


@lru_cache(maxsize=32)
def _driver(tenant_id: str, subscription_id: str, key: str, secret: str, location: str
            ) -> NodeDriver:
    return _Driver(tenant_id, subscription_id, key, secret,  # type: ignore[no-untyped-call]
                   region=location)


def create(driver: NodeDriver, *, name: str, user_data: str, tags: Mapping[str, str],
           instance_type: str, image: str, location: str, spot: bool,
           options: Mapping[str, Any]) -> Node:
    """A VM of size `instance_type` from the marketplace image `image`
    ("publisher:offer:sku:version"); logins only with the option `ssh_public_key`, if set
    (otherwise libcloud sets a random password nobody keeps)."""
    publisher, offer, sku, version = image.split(":")
    where = NodeLocation(location, location, "", driver)
    key = options.get("ssh_public_key")
    azure: Any = driver   # libcloud's Azure arguments are untyped
    node: Node = azure.create_node(
        name, NodeSize(instance_type, instance_type, 0, 0, 0, 0, driver),
        AzureImage(version, sku, offer, publisher, location, driver),  # type: ignore[no-untyped-call]
        NodeAuthSSHKey(key) if key else None, str(options["resource_group"]),
        location=where, ex_network=options["network"],
        ex_subnet=options.get("subnet", "default"), ex_tags=dict(tags),
        ex_customdata=user_data.encode(), ex_use_managed_disks=True, ex_os_disk_delete=True)
    return node


def list_ours(driver: NodeDriver, cluster: str) -> list[Node]:
    """VMs in the driver's location tagged with our cluster (one call per page: no NIC or
    power-state look-ups; the provisioning state gives `state`)."""
    azure: Any = driver
    where = azure.default_location.id
    return [n for n in azure.list_nodes(ex_fetch_nic=False, ex_fetch_power_state=False)
            if n.extra.get("location") == where
            and (n.extra.get("tags") or {}).get(CLUSTER_TAG) == cluster]


def destroy(driver: NodeDriver, node: Node) -> bool:
    return bool(driver.destroy_node(node))   # polls until gone, then its NIC and disk


def node_id(vm: Node) -> str:
    return str((vm.extra.get("tags") or {}).get(NODE_TAG) or vm.name)
