"""Every cloud through libcloud: our `local` driver beside libcloud's own (EC2, GCE, ...).

The control plane calls `create`, `list_ours` and `destroy` with a region from the config;
which driver answers is config, not code. Every machine we create carries our tags (cluster,
pool, node id), and `list_ours` returns only machines with our cluster tag, so a cloud
account shared with other systems is safe. A refusal for capacity or quota is raised as
CapacityError, whatever the cloud's words, so the provisioner can fail over.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeLocation
from libcloud.compute.providers import get_driver, set_driver

from common.config import Config, Provider, Region
from common.errors import ConfigError
from provisioner import ec2
from provisioner.errors import CapacityError

# What a provider's API may raise besides CapacityError: worth retrying with backoff
# (requests' and socket errors are OSErrors).
PROVIDER_ERRORS: tuple[type[Exception], ...] = (LibcloudError, BaseHTTPError, OSError)

LOCAL = "voice-local"
TAG_CLUSTER, TAG_POOL, TAG_NODE = ec2.CLUSTER_TAG, ec2.POOL_TAG, ec2.NODE_TAG
# What clouds say when they have no machine for us, or we hit a quota (EC2's, then GCE's
# and Azure's words for the same).
CAPACITY_CODES = (*ec2.CAPACITY_CODES, "QUOTA_EXCEEDED", "ZONE_RESOURCE_POOL_EXHAUSTED",
                  "SkuNotAvailable", "OperationNotAllowed")


def register() -> None:
    """Register our drivers with libcloud once (set_driver raises on a second call)."""
    try:
        get_driver(LOCAL)
    except AttributeError:
        set_driver(LOCAL, "provisioner.local_driver", "LocalNodeDriver")


@lru_cache(maxsize=64)
def _local(redis_url: str, boot_s: float, max_nodes: tuple[tuple[str, int], ...]
           ) -> NodeDriver:
    register()
    return get_driver(LOCAL)(redis_url, boot_s=boot_s, max_nodes=dict(max_nodes))


def driver_for(cfg: Config, region: Region) -> NodeDriver:
    """The libcloud driver that creates machines in `region`."""
    p = cfg.provider(region.provider)
    if p.driver == "local":
        if not cfg.redis_url:
            raise ConfigError("the local cloud keeps its VMs in Redis: set REDIS_URL")
        quotas = tuple(sorted((r.name, r.max_nodes) for r in cfg.regions
                              if r.provider == p.name and r.max_nodes is not None))
        return _local(cfg.redis_url, p.boot_s, quotas)
    if p.driver == "ec2":
        return ec2.ec2_driver(region.provider_region or region.name,
                              access_key=cfg.aws_access_key_id,
                              secret_key=cfg.aws_secret_access_key,
                              endpoint=p.options.get("endpoint"))
    if p.driver == "byo":
        raise ConfigError(f"region {region.name!r} is served by own machines (provider "
                          f"{p.name!r}, driver byo): nothing to create there; they join with "
                          "`voicectl byo-token`")
    return _other(p, region)


def _other(p: Provider, region: Region) -> NodeDriver:
    """Any other libcloud compute provider: `driver` names its Provider constant (e.g.
    "gce", "azure_arm"), `options` are its constructor's keyword arguments."""
    try:
        cls = get_driver(p.driver)
    except AttributeError:
        raise ConfigError(f"provider {p.name!r}: libcloud knows no compute driver "
                          f"{p.driver!r}; use local, ec2, byo or a libcloud Provider name"
                          ) from None
    opts = {k: v for k, v in p.options.items()
            if k not in ("instance_type", "image", "spot", "size")}
    return cls(**opts)


def tags_for(cfg: Config, node_id: str, pool: str) -> dict[str, str]:
    return {TAG_CLUSTER: cfg.cluster, TAG_POOL: pool, TAG_NODE: node_id, "Name": node_id}


def create(cfg: Config, region: Region, node_id: str, user_data: str,
           tags: Mapping[str, str]) -> Node:
    """Create one node machine that runs `user_data` at boot. Idempotent per node id (EC2:
    the node id is the client token; the local driver and others: the node id is the name).
    Raises CapacityError when the cloud has no room or we hit a quota."""
    p = cfg.provider(region.provider)
    driver = driver_for(cfg, region)
    try:
        if p.driver == "ec2":
            return ec2.create(driver, name=node_id, user_data=user_data, tags=tags,
                              client_token=node_id, instance_type=str(p.options["instance_type"]),
                              image=str(p.options["image"]), spot=p.spot)
        size = next(iter(driver.list_sizes()))
        if p.driver == "local":
            image = NodeImage("voice-node", "voice worker node", driver)
            location = NodeLocation(region.name, region.name, "", driver)
        else:
            image = NodeImage(str(p.options.get("image")), None, driver)
            location = NodeLocation(region.provider_region or region.name,
                                    region.provider_region or region.name, "", driver)
        return driver.create_node(name=node_id, size=size, image=image, location=location,
                                  ex_userdata=user_data, ex_metadata=dict(tags))
    except CapacityError:
        raise
    except Exception as e:   # libcloud raises many kinds; only capacity is translated
        code = next((c for c in CAPACITY_CODES if c in str(e)), None)
        if code is None:
            raise
        raise CapacityError(f"{p.name} has no room in {region.name} "
                            f"({region.provider_region or region.name}): {e}",
                            provider_region=region.provider_region or region.name,
                            instance_type=str(p.options.get("instance_type", "")),
                            code=code) from e


def list_ours(cfg: Config, region: Region) -> list[Node]:
    """Machines with our cluster tag in `region`'s provider region (no one else's)."""
    driver = driver_for(cfg, region)
    if cfg.provider(region.provider).driver == "ec2":
        return list(ec2.list_ours(driver, cfg.cluster))
    return [n for n in driver.list_nodes()
            if (n.extra.get("tags") or {}).get(TAG_CLUSTER) == cfg.cluster]


def node_id_of(vm: Node) -> str:
    return str((vm.extra.get("tags") or {}).get(TAG_NODE) or vm.name)


def destroy(cfg: Config, region: Region, vm: Node) -> None:
    driver = driver_for(cfg, region)
    if cfg.provider(region.provider).driver == "ec2":
        ec2.destroy(driver, vm)
        return
    driver.destroy_node(vm)


def machine_regions(cfg: Config) -> list[Region]:
    """One region per distinct machine pool we can create in (provider, provider region)."""
    seen: dict[tuple[str, str], Region] = {}
    for r in cfg.regions:
        p = cfg.provider(r.provider)
        key = (p.name, r.provider_region or (r.name if p.driver != "local" else ""))
        if p.bootable and key not in seen:
            seen[key] = r
    return list(seen.values())
