"""EC2 through libcloud's own driver: real AWS, or any EC2-compatible endpoint (moto in tests
and the dev cloud).

Every VM we make carries our tags (`voice:cluster`, `voice:pool`, `voice:node`, `Name`), so
one AWS account can hold other people's instances beside ours: `list_ours` sees only the
cluster's. Creates are idempotent by client token. A refusal for capacity or quota raises
`CapacityError`; every other libcloud error propagates unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from libcloud.common.exceptions import BaseHTTPError
from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeSize
from libcloud.compute.drivers.ec2 import NAMESPACE, EC2Connection, EC2NodeDriver, EC2Response
from libcloud.compute.providers import Provider, get_driver
from libcloud.compute.types import NodeState

from common.config import Config, Region
from common.config import Provider as ProviderConfig
from provisioner.clouds.protocol import CLUSTER_TAG, NODE_TAG, POOL_TAG
from provisioner.errors import CapacityError

__all__ = ["CLUSTER_TAG", "POOL_TAG", "NODE_TAG", "TOKEN_TAG", "CAPACITY_CODES",
           "CapacityError", "ec2_driver", "make_driver", "create", "list_ours", "destroy",
           "node_id", "is_gone"]

TOKEN_TAG = "voice:client-token"   # see _existing: moto ignores ClientToken

# EC2 error codes meaning "not now, not here": capacity, quota or an offer this zone lacks.
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded", "InsufficientCapacity", "SpotMaxPriceTooLow",
    "Unsupported", "UnfulfillableCapacity",   # the last: no spare spot capacity now
})
GONE_STATES = frozenset({"shutting-down", "terminated"})

_XMLNS = re.compile(r'xmlns="http://ec2\.amazonaws\.com/doc/[^"]*"')
_ERROR_XMLNS = re.compile(r'<Response xmlns="[^"]*">')
_ERROR_LINE = re.compile(r"^(?:Server\.|Client\.)?([A-Za-z.]+): ?(.*)$")


class _SlashResponse(EC2Response):
    """moto 5 answers `xmlns=".../doc/2016-11-15"`; AWS (and libcloud's xpaths) end it with
    a slash, so without this libcloud reads moto's RunInstances as no nodes at all. moto's
    error documents carry that namespace too, where AWS's have none (libcloud would read
    an empty message): it goes."""

    def parse_body(self) -> Any:
        self.body = _XMLNS.sub(f'xmlns="{NAMESPACE}"', self.body or "", count=1)
        return super().parse_body()  # type: ignore[no-untyped-call]

    def parse_error(self) -> Any:
        self.body = _ERROR_XMLNS.sub("<Response>", self.body or "", count=1)
        return super().parse_error()  # type: ignore[no-untyped-call]


class _SlashConnection(EC2Connection):
    responseCls = _SlashResponse


class CompatibleEC2NodeDriver(EC2NodeDriver):
    """libcloud's EC2 driver pointed at an EC2-compatible endpoint (moto, LocalStack)."""

    connectionCls = _SlashConnection
    name = "EC2-compatible endpoint"


@lru_cache(maxsize=32)
def ec2_driver(provider_region: str, *, access_key: str, secret_key: str,
               endpoint: str | None = None) -> NodeDriver:
    """A driver for one EC2 region: AWS itself, or `endpoint` ("http://127.0.0.1:5000").

    Cached per arguments, so tasks share a driver (and its HTTP connection) per region."""
    if endpoint is None:
        return get_driver(Provider.EC2)(access_key, secret_key, region=provider_region)
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise ValueError(f"EC2 endpoint {endpoint!r} is not a URL like "
                         "'http://127.0.0.1:5000' (scheme, host, optional port, no path)")
    secure = url.scheme == "https"
    return CompatibleEC2NodeDriver(  # type: ignore[no-untyped-call]
        access_key, secret_key, secure=secure, host=url.hostname,
        port=url.port or (443 if secure else 80), region=provider_region,
        signature_version="4")   # with SigV2 moto cannot tell the service, answers as S3


def make_driver(cfg: Config, provider: ProviderConfig, region: Region) -> NodeDriver:
    """The driver for `region` (its provider_region, e.g. "us-west-2"); keys from the
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), `endpoint` from the options."""
    return ec2_driver(region.provider_region or region.name,
                      access_key=cfg.aws_access_key_id, secret_key=cfg.aws_secret_access_key,
                      endpoint=provider.options.get("endpoint"))


def create(driver: NodeDriver, *, name: str, user_data: str, tags: Mapping[str, str],
           instance_type: str, image: str, spot: bool = False, client_token: str = "",
           location: str = "", options: Mapping[str, Any] | None = None) -> Node:
    """RunInstances for one VM named `name`, tagged at create, booting `user_data`.

    `tags` must hold `voice:cluster` (or `list_ours` would never see the VM); `voice:node`
    and `Name` default to `name`. A retry with the same `client_token` (default: `name`, and
    `name-spot` for a spot one, so that an on-demand create after a refused spot one is a
    request of its own) returns the first call's instance instead of a second VM.
    `location` and `options` are not read: the driver is the region's. Raises
    CapacityError on a capacity or quota refusal; other libcloud errors propagate."""
    client_token = client_token or (f"{name}-spot" if spot else name)
    if CLUSTER_TAG not in tags:
        raise ValueError(f"tags {dict(tags)!r} lack {CLUSTER_TAG!r}: list_ours could never "
                         "find this VM, and nothing would ever destroy it")
    all_tags = {"Name": name, NODE_TAG: name, **tags, TOKEN_TAG: client_token}
    existing = _existing(driver, client_token)
    if existing is not None:
        return existing
    cloud: Any = driver   # EC2's ex_* options and region_name are not in NodeDriver's types
    size = NodeSize(id=instance_type, name=instance_type, ram=0, disk=0, bandwidth=0,
                    price=0, driver=driver)
    try:
        made = cloud.create_node(name=name, size=size,
                                 image=NodeImage(id=image, name=image, driver=driver),
                                 ex_userdata=user_data, ex_metadata=all_tags,
                                 ex_clienttoken=client_token, ex_spot=spot)
    except BaseHTTPError as e:
        code, words = _capacity_refusal(str(e.message))
        if code is None:
            raise
        market = "spot" if spot else "on-demand"
        raise CapacityError(
            f"EC2 {cloud.region_name} has no {market} {instance_type} for us now "
            f"({code}: {words}); try another region, instance type or market",
            provider_region=cloud.region_name, instance_type=instance_type, code=code) from e
    if not isinstance(made, Node):   # libcloud returns a list unless exactly one parsed
        raise RuntimeError(f"RunInstances in {cloud.region_name} returned {made!r}, not one "
                           "instance: is the endpoint's XML namespace the one libcloud reads?")
    return made


def list_ours(driver: NodeDriver, cluster: str, *, include_gone: bool = False) -> list[Node]:
    """This cluster's instances (filtered by tag on the server, checked again here).

    Shutting-down and terminated ones are left out unless `include_gone`. Each node's
    `extra["tags"]` names its node id (`voice:node`) and pool (`voice:pool`)."""
    nodes = driver.list_nodes(ex_filters={f"tag:{CLUSTER_TAG}": cluster})
    return [n for n in nodes if n.extra.get("tags", {}).get(CLUSTER_TAG) == cluster
            and (include_gone or not is_gone(n))]


def destroy(driver: NodeDriver, node: Node) -> bool:
    """TerminateInstances; True once the cloud accepted it (it stays `shutting-down` a while)."""
    return bool(driver.destroy_node(node))


def node_id(vm: Node) -> str:
    return str(vm.extra.get("tags", {}).get(NODE_TAG) or vm.name)


def is_gone(node: Node) -> bool:
    """Shutting down or terminated: not a VM we have any more."""
    return node.state == NodeState.TERMINATED or node.extra.get("status") in GONE_STATES


def _existing(driver: NodeDriver, client_token: str) -> Node | None:
    """The instance an earlier create with this token made, if any. AWS itself answers a
    repeated ClientToken with the first instance; moto 5 and some EC2-compatible endpoints
    ignore the token, so we also look for it in a tag first (one DescribeInstances)."""
    for node in driver.list_nodes(ex_filters={f"tag:{TOKEN_TAG}": client_token}):
        if node.extra.get("tags", {}).get(TOKEN_TAG) == client_token:
            return node
    return None


def _capacity_refusal(message: str) -> tuple[str | None, str]:
    """(code, words) of the first capacity code in libcloud's "Code: words" lines."""
    for line in message.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and m.group(1) in CAPACITY_CODES:
            return m.group(1), m.group(2)
    return None, message
