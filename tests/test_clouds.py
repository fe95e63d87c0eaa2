"""Several providers at once through libcloud: a local cloud, EC2 (a real moto server; its
instances boot from their user-data through the test "cloud-init"), cheapest first, fail
over when a cloud is out of capacity, and never touch a machine without our tags."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from importlib import metadata
from pathlib import Path

import pytest
from conftest import (
    ControlPlane,
    closed_code,
    fleet_config,
    lobby,
    running_control_plane,
    start_stream,
)
from libcloud.compute.base import NodeImage, NodeSize

from provisioner import clouds, fleet
from provisioner.clouds import ec2
from provisioner.errors import CapacityError
from voicectl import devcloud

CONFIG = """
[providers.local]
price_per_hour = "1.10"
billing_increment_s = 60
boot_s = 0.2

[providers.aws]
driver = "ec2"
price_per_hour = "0.45"
spot_price_per_hour = "0.19"
billing_increment_s = 1
boot_s = 0.2
instance_type = "g4dn.xlarge"
image = "{image}"
spot = true
endpoint = "{endpoint}"
node_port = 0

[[regions]]
name = "us-west"
provider = "local"
lat = 37.8
lon = -122.4

[[regions]]
name = "us-west-aws"
provider = "aws"
provider_region = "us-west-2"
lat = 45.6
lon = -121.2

[[models]]
package = "models/miku"

[[models]]
package = "models/teto"
"""


@pytest.fixture
def fault(moto: str) -> Iterator[devcloud.CapacityFault]:
    with devcloud.CapacityFault(moto) as f:
        yield f


@pytest.fixture
def cp(redis_url: str, sqlite_url: str, tmp_path: Path, image: str, moto: str,
       fault: devcloud.CapacityFault) -> Iterator[tuple[ControlPlane, devcloud.CloudInit]]:
    cluster = f"t-{uuid.uuid4().hex[:8]}"     # one moto serves the run: tests keep apart
    cfg = fleet_config(redis_url, tmp_path, CONFIG.format(image=image, endpoint=fault.endpoint),
                       database_url=sqlite_url, cluster=cluster, idle_grace_s=30.0)
    with running_control_plane(cfg) as plane, \
            devcloud.CloudInit(moto, "us-west-2", log_dir=tmp_path / "vms",
                               cluster=cluster, public_ip="127.0.0.2") as init:
        yield plane, init


def aws_driver(cp: ControlPlane) -> object:
    region = cp.config.region("us-west-aws")
    assert region is not None
    return clouds.driver_for(cp.config, region)


def test_cheapest_provider_boots_from_user_data_and_streams(
        cp: tuple[ControlPlane, devcloud.CloudInit]) -> None:
    plane, init = cp
    ready = lobby(plane.ws_url, "user=a1&model=miku&lat=37.8&lon=-122.4", timeout_s=60)[-1]
    assert ready["type"] == "ready", ready
    rec = plane.state.node(ready["node_id"])
    assert rec is not None and (rec.provider, rec.region, rec.home) == (
        "aws", "us-west-aws", "us-west")            # cheaper, within the latency budget
    [vm] = [vm for vm in ec2.list_ours(aws_driver(plane), plane.config.cluster)
            if vm.extra["tags"][ec2.NODE_TAG] == rec.id]
    tags = vm.extra["tags"]
    assert tags[ec2.CLUSTER_TAG] == plane.config.cluster and tags["Name"] == rec.id
    assert tags[ec2.POOL_TAG] == "miku|1|us-west"
    # `spot = true` offers spot beside on-demand: the machine is what the record says, spot
    # for the policy's buffer (Decisions.spot), on-demand for the queue (Decisions.boot)
    assert (vm.extra.get("instance_lifecycle") == "spot") == rec.spot
    assert vm.id in init.running()                  # its user-data is what runs the node
    user_data = devcloud.read_user_data(aws_driver(plane), vm.id)   # type: ignore[arg-type]
    assert user_data.startswith("#!/bin/sh\n")
    # the control plane's own version of the project, not whatever is newest
    assert f"pip install --quiet 'voicechanger=={metadata.version('voicechanger')}'" in user_data
    assert f"\nexec voicectl node --join {plane.base_url} --token j-" in user_data
    assert user_data.rstrip().endswith(" --public-url auto --port 0")
    # the address it announced is the one the instance metadata service gave, and streams
    assert rec.url.startswith("ws://127.0.0.2:") and init.metadata.asked >= 1
    ws = start_stream(ready)
    ws.send(b"\x00\x00" * 320)
    assert len(ws.receive(timeout=5)) == 640
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000
    plane.settle(time.time() + 120)
    bill = {r["node_id"]: r for r in plane.ledger.node_costs()}[rec.id]
    assert bill["provider"] == "aws" and Decimal(bill["price_per_hour"]) == (
        Decimal("0.19") if rec.spot else Decimal("0.45"))


def test_out_of_capacity_fails_over_at_once_and_says_so(
        cp: tuple[ControlPlane, devcloud.CloudInit], fault: devcloud.CapacityFault) -> None:
    plane, _ = cp
    fault.refuse = True                             # EC2: InsufficientInstanceCapacity
    msgs = lobby(plane.ws_url, "user=b1&model=teto&lat=37.8&lon=-122.4", timeout_s=60)
    assert msgs[-1]["type"] == "ready", msgs
    rec = plane.state.node(msgs[-1]["node_id"])
    assert rec is not None and (rec.provider, rec.region) == ("local", "us-west")
    assert fault.refused >= 1
    assert "us-west-aws" in plane.state.constrained(time.time())
    notes = [m.get("note", "") for m in msgs if m["type"] in ("queued", "booting")]
    assert any("out of GPU capacity in us-west-aws" in n for n in notes), msgs


def test_sweep_destroys_only_our_orphans(cp: tuple[ControlPlane, devcloud.CloudInit],
                                         image: str) -> None:
    plane, _ = cp
    driver = aws_driver(plane)
    size = NodeSize("g4dn.xlarge", "", 0, 0, 0, 0, driver)
    theirs = driver.create_node(name="someone-elses", size=size,            # type: ignore
                                image=NodeImage(image, None, driver))        # untagged
    orphan = ec2.create(driver, name="n-orphan", user_data="#!/bin/sh\ntrue\n",  # type: ignore
                        tags=clouds.tags_for(plane.config, "n-orphan", "miku|1|us-west"),
                        client_token="n-orphan", instance_type="g4dn.xlarge", image=image)
    plane.wait(lambda: not any(vm.id == orphan.id
                               for vm in ec2.list_ours(driver, plane.config.cluster)),  # type: ignore
               20, "tagged orphan not destroyed by the beat's sweep")
    live = {n.id: n for n in driver.list_nodes()}                                # type: ignore
    assert live[theirs.id].state == "running"        # never touch what is not ours
    # After a Redis loss every tagged VM is an orphan: destroyed, never leaked.
    ready = lobby(plane.ws_url, "user=c1&model=miku&lat=37.8&lon=-122.4", timeout_s=60)[-1]
    plane.state.forget_node(ready["node_id"])
    assert fleet.sweep(plane.state, plane.config) == [ready["node_id"]]
    driver.destroy_node(theirs)                                                  # type: ignore


def test_a_regions_quota_is_a_capacity_refusal(redis_url: str, tmp_path: Path) -> None:
    """The local driver enforces a region's max_nodes with a libcloud error, as a cloud
    out of quota would; the clouds seam turns it into CapacityError (what fails over)."""
    toml = CONFIG.replace('name = "us-west"\nprovider = "local"',
                          'name = "us-west"\nprovider = "local"\nmax_nodes = 1')
    cfg = fleet_config(redis_url, tmp_path, toml.format(image="ami-x", endpoint="http://x"))
    region = cfg.region("us-west")
    assert region is not None and region.max_nodes == 1
    script = "#!/bin/sh\nexec sleep 30\n"
    try:
        clouds.create(cfg, region, "n-q1", script, clouds.tags_for(cfg, "n-q1", "p"))
        again = clouds.create(cfg, region, "n-q1", script, clouds.tags_for(cfg, "n-q1", "p"))
        assert again.name == "n-q1"                      # idempotent per node id
        with pytest.raises(CapacityError, match="InstanceLimitExceeded.*max_nodes"):
            clouds.create(cfg, region, "n-q2", script, clouds.tags_for(cfg, "n-q2", "p"))
    finally:
        for vm in clouds.list_ours(cfg, region):
            clouds.destroy(cfg, region, vm)
    assert clouds.list_ours(cfg, region) == []
