"""The one seam to every cloud: `create`, `list_ours` and `destroy` by a region of the config.

Which module answers is the region's provider's `driver`: `local` (our libcloud driver),
`ec2`, `gce`, `azure_arm` or `openstack`, each a `protocol.Cloud` that speaks its cloud's
idiom for user-data, tags and instance types. Every machine we create carries our tags
(cluster, pool, node id), and `list_ours` returns only machines with our cluster tag, so a
cloud account shared with other systems is safe. A refusal for capacity or quota is raised
as CapacityError, whatever the cloud's words, so the provisioner can fail over. A new
libcloud provider is one module beside these, a line in `CLOUDS`, and its options in the
config (`common.config.DRIVER_OPTIONS`, docs/clouds.md).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeDriver

from common.config import Config, Region
from common.errors import ConfigError
from provisioner.clouds import azure, ec2, gce, local, openstack
from provisioner.clouds.protocol import CLUSTER_TAG, NODE_TAG, POOL_TAG, Cloud
from provisioner.errors import CapacityError

__all__ = ["PROVIDER_ERRORS", "LOCAL", "TAG_CLUSTER", "TAG_POOL", "TAG_NODE", "CAPACITY_CODES",
           "CLOUDS", "register", "driver_for", "tags_for", "create", "list_ours", "node_id_of",
           "destroy", "machine_regions"]

# What a provider's API may raise besides CapacityError: worth retrying with backoff
# (requests' and socket errors are OSErrors).
PROVIDER_ERRORS: tuple[type[Exception], ...] = (LibcloudError, BaseHTTPError, OSError)

# The config's driver name -> its module; a libcloud driver's `type` is the same name.
CLOUDS: dict[str, Cloud] = {"local": local, "ec2": ec2, "gce": gce, "azure_arm": azure,
                            "openstack": openstack}

LOCAL = local.LOCAL
TAG_CLUSTER, TAG_POOL, TAG_NODE = CLUSTER_TAG, POOL_TAG, NODE_TAG
CAPACITY_CODES = tuple(sorted({code for c in CLOUDS.values() for code in c.CAPACITY_CODES}))
register = local.register


def _cloud(driver: str) -> Cloud:
    try:
        return CLOUDS[driver]
    except KeyError:
        raise ConfigError(f"no cloud module for driver {driver!r}; use one of "
                          f"{sorted(CLOUDS)}, or byo for own machines") from None


def driver_for(cfg: Config, region: Region) -> NodeDriver:
    """The libcloud driver that creates machines in `region`."""
    p = cfg.provider(region.provider)
    if not p.bootable:
        raise ConfigError(f"region {region.name!r} is served by own machines (provider "
                          f"{p.name!r}, driver byo): nothing to create there; they join with "
                          "`voicectl byo-token`")
    return _cloud(p.driver).make_driver(cfg, p, region)


def tags_for(cfg: Config, node_id: str, pool: str) -> dict[str, str]:
    return {TAG_CLUSTER: cfg.cluster, TAG_POOL: pool, TAG_NODE: node_id, "Name": node_id}


def create(cfg: Config, region: Region, node_id: str, user_data: str,
           tags: Mapping[str, str], spot: bool = False) -> Node:
    """Create one node machine of the provider's `instance_type` that runs `user_data` at
    boot, a spot one if `spot` (the provider must offer spot: `spot = true`). Idempotent per
    node id (the machine's name; EC2's client token). Raises CapacityError when the cloud
    has no room (for spot: no spot room) or we hit a quota."""
    p = cfg.provider(region.provider)
    if spot and not p.spot:
        raise ConfigError(f"provider {p.name!r} offers no spot machines (no `spot = true` in "
                          f"[providers.{p.name}]); boot on-demand there, or configure spot")
    cloud, driver = _cloud(p.driver), driver_for(cfg, region)
    where = region.provider_region or region.name
    instance_type = str(p.options.get("instance_type", ""))
    try:
        return cloud.create(driver, name=node_id, user_data=user_data, tags=tags,
                            instance_type=instance_type, image=str(p.options.get("image", "")),
                            location=where, spot=spot, options=p.options)
    except PROVIDER_ERRORS as e:
        code = _capacity_code(e, cloud.CAPACITY_CODES)
        if code is None:
            raise
        raise CapacityError(f"{p.name} has no room for {instance_type or 'a node'} in "
                            f"{region.name} ({where}): {e}; trying another region",
                            provider_region=where, instance_type=instance_type,
                            code=code) from e


def _capacity_code(error: Exception, codes: Collection[str]) -> str | None:
    """The first of `codes` that `error` says, as a whole word (in its text or its `code`,
    where GCE keeps it), or None."""
    said = f"{getattr(error, 'code', '')} {error}"
    return next((c for c in codes if re.search(rf"\b{re.escape(c)}\b", said)), None)


def list_ours(cfg: Config, region: Region) -> list[Node]:
    """Machines with our cluster tag in `region`'s provider region (no one else's)."""
    return _cloud(cfg.provider(region.provider).driver).list_ours(driver_for(cfg, region),
                                                                   cfg.cluster)


def node_id_of(vm: Node) -> str:
    return _cloud(str(vm.driver.type)).node_id(vm)


def destroy(cfg: Config, region: Region, vm: Node) -> None:
    _cloud(cfg.provider(region.provider).driver).destroy(driver_for(cfg, region), vm)


def machine_regions(cfg: Config) -> list[Region]:
    """One region per distinct machine pool we can create in (provider, provider region)."""
    seen: dict[tuple[str, str], Region] = {}
    for r in cfg.regions:
        p = cfg.provider(r.provider)
        key = (p.name, r.provider_region or (r.name if p.driver != "local" else ""))
        if p.bootable and key not in seen:
            seen[key] = r
    return list(seen.values())
