"""provisioner.clouds.ec2 against a real moto EC2 server (our child on a free port), and the dev
cloud around it: the capacity fault proxy and CloudInit running user-data as processes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from libcloud.common.exceptions import BaseHTTPError
from libcloud.compute.base import NodeDriver, NodeImage, NodeSize

from provisioner.clouds import ec2
from provisioner.errors import CapacityError
from voicectl import devcloud

REGION = "us-west-2"
TYPE = "g4dn.xlarge"
KEY = "testing"        # fake credentials: moto takes any, nothing reads the environment


@pytest.fixture
def driver(moto: str) -> NodeDriver:
    return ec2.ec2_driver(REGION, access_key=KEY, secret_key=KEY, endpoint=moto)


@pytest.fixture
def cluster() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"     # one moto serves the module: tests keep apart


def make(driver: NodeDriver, image: str, cluster: str, name: str, **kw: Any) -> Any:
    return ec2.create(driver, name=name, user_data=kw.pop("user_data", "#!/bin/sh\ntrue\n"),
                      tags={ec2.CLUSTER_TAG: cluster, ec2.POOL_TAG: "miku"},
                      client_token=kw.pop("client_token", uuid.uuid4().hex),
                      instance_type=TYPE, image=image, **kw)


def test_create_tags_user_data_and_client_token(driver: NodeDriver, image: str,
                                                cluster: str) -> None:
    script = "#!/bin/sh\nexec voicectl node --join http://127.0.0.1:8000 --token T\n"
    node = make(driver, image, cluster, "n-1", user_data=script, client_token="tok-" + cluster)
    assert node.id.startswith("i-") and node.name == "n-1"
    assert node.extra["client_token"] == "tok-" + cluster       # the token reached EC2
    [seen] = ec2.list_ours(driver, cluster)
    assert seen.id == node.id and seen.extra["instance_type"] == TYPE
    assert seen.extra["image_id"] == image
    tags = seen.extra["tags"]
    assert {k: tags[k] for k in ("Name", ec2.NODE_TAG, ec2.CLUSTER_TAG, ec2.POOL_TAG)} == {
        "Name": "n-1", ec2.NODE_TAG: "n-1", ec2.CLUSTER_TAG: cluster, ec2.POOL_TAG: "miku"}
    assert devcloud.read_user_data(driver, node.id) == script

    again = make(driver, image, cluster, "n-1", user_data=script,
                 client_token="tok-" + cluster)                 # a retried task
    assert again.id == node.id
    assert len(ec2.list_ours(driver, cluster)) == 1


def test_spot_create(driver: NodeDriver, image: str, cluster: str) -> None:
    node = make(driver, image, cluster, "n-spot", spot=True)
    [seen] = ec2.list_ours(driver, cluster)
    assert seen.id == node.id
    assert seen.extra["instance_lifecycle"] == "spot"
    on_demand = make(driver, image, cluster, "n-od")
    lifecycle = {n.id: n.extra.get("instance_lifecycle") for n in ec2.list_ours(driver, cluster)}
    assert lifecycle[node.id] == "spot" and lifecycle[on_demand.id] != "spot"


def test_list_ours_ignores_other_instances_in_a_shared_account(
        driver: NodeDriver, image: str, cluster: str) -> None:
    ours = make(driver, image, cluster, "n-ours")
    theirs = driver.create_node(      # someone else's VM in the same account, no tag of ours
        name="their-db", size=NodeSize(TYPE, TYPE, 0, 0, 0, 0, driver),
        image=NodeImage(image, image, driver), ex_metadata={"team": "billing"})
    other_cluster = make(driver, image, cluster + "-staging", "n-staging")
    found = {n.id for n in ec2.list_ours(driver, cluster)}
    assert found == {ours.id}
    everything = {n.id for n in driver.list_nodes()}
    assert {theirs.id, other_cluster.id} <= everything


def test_destroy(driver: NodeDriver, image: str, cluster: str) -> None:
    keep = make(driver, image, cluster, "n-keep")
    doomed = make(driver, image, cluster, "n-doomed")
    assert ec2.destroy(driver, doomed) is True
    assert {n.id for n in ec2.list_ours(driver, cluster)} == {keep.id}
    gone = {n.id: n for n in ec2.list_ours(driver, cluster, include_gone=True)}
    assert ec2.is_gone(gone[doomed.id])


def test_create_requires_the_cluster_tag(driver: NodeDriver, image: str) -> None:
    with pytest.raises(ValueError, match="voice:cluster"):
        ec2.create(driver, name="n", user_data="", tags={"voice:pool": "p"},
                   client_token="t", instance_type=TYPE, image=image)


def test_capacity_error_on_insufficient_capacity(moto: str, image: str,
                                                 cluster: str) -> None:
    with devcloud.CapacityFault(moto) as fault:
        driver = ec2.ec2_driver(REGION, access_key=KEY, secret_key=KEY,
                                endpoint=fault.endpoint)
        fault.refuse_next(1)
        with pytest.raises(CapacityError) as err:
            make(driver, image, cluster, "n-refused", client_token="tok-r-" + cluster)
        assert err.value.code == "InsufficientInstanceCapacity"
        assert err.value.provider_region == REGION and err.value.instance_type == TYPE
        for words in (REGION, TYPE, "InsufficientInstanceCapacity", "do not have sufficient"):
            assert words in str(err.value)
        assert ec2.list_ours(driver, cluster) == []      # refused: nothing was made

        node = make(driver, image, cluster, "n-refused", client_token="tok-r-" + cluster)
        assert [n.id for n in ec2.list_ours(driver, cluster)] == [node.id]   # forwarded
        fault.refuse = True
        with pytest.raises(CapacityError):
            make(driver, image, cluster, "n-2", spot=True)
        assert fault.refused == 2

        fault.refuse = False    # other cloud errors propagate as libcloud raised them
        with pytest.raises(BaseHTTPError) as other:
            ec2.create(driver, name="n-3", user_data="", tags={ec2.CLUSTER_TAG: cluster},
                       client_token=uuid.uuid4().hex, instance_type=TYPE,
                       image="ami-00000000")
        assert not isinstance(other.value, CapacityError), other.value.message
        assert "InvalidAMIID" in other.value.message


@pytest.mark.parametrize("message, code", [
    ("InsufficientInstanceCapacity: We currently do not have", "InsufficientInstanceCapacity"),
    ("VcpuLimitExceeded: You have requested more vCPU", "VcpuLimitExceeded"),
    ("Unsupported: Your requested instance type (g5.xlarge) is not", "Unsupported"),
    ("Server.InsufficientCapacity: no", "InsufficientCapacity"),
    ("InvalidAMIID.NotFound: The image id '[ami-1]' does not exist", None),
    ("UnauthorizedOperation: You are not authorized", None),
])
def test_capacity_codes(message: str, code: str | None) -> None:
    assert ec2._capacity_refusal(message)[0] == code


def test_cloud_init_runs_user_data_and_kills_it_on_terminate(
        driver: NodeDriver, moto: str, image: str, cluster: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROL_PLANE_SECRET", "not-for-vms")   # ours, not the VM's
    marker = tmp_path / "booted"
    script = f'#!/bin/sh\necho "hi $GREETING $HOME" > {marker}\nexec sleep 60\n'
    with devcloud.CloudInit(moto, REGION, cluster=cluster, log_dir=tmp_path / "logs",
                            env=devcloud.minimal_env(GREETING="from-the-vm"),
                            grace_s=1.0) as init:
        node = make(driver, image, cluster, "n-boot", user_data=script)
        make(driver, image, cluster + "-other", "n-not-ours", user_data=script)
        pid = wait_for(lambda: init.running().get(node.id), msg="user-data never started")
        assert wait_for(marker.exists, msg="the script never wrote its marker")
        assert marker.read_text().split()[:2] == ["hi", "from-the-vm"]
        assert list(init.running()) == [node.id]           # the other cluster's is not ours
        assert "CONTROL_PLANE_SECRET" not in Path(f"/proc/{pid}/environ").read_text()
        assert os.getpgid(pid) == pid                          # its own process group

        ec2.destroy(driver, node)
        wait_for(lambda: node.id not in init.running(), msg="terminate left it running")
        wait_for(lambda: not _alive(pid), timeout_s=5, msg=f"pid {pid} outlived its VM")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_cloud_init_serves_a_spot_notice_and_takes_the_instance_back_at_its_time(
        driver: NodeDriver, moto: str, image: str, cluster: str, tmp_path: Path) -> None:
    """The dev cloud's spot interruption: a notice (a tag) is served by that instance's
    metadata alone, and at its time the instance is terminated and its process ends."""
    import time

    from worker_node.metadata import SpotWatch

    script = '#!/bin/sh\necho "$VOICE_METADATA_URL"\nexec sleep 60\n'
    with devcloud.CloudInit(moto, REGION, cluster=cluster, log_dir=tmp_path / "logs",
                            poll_s=0.1, grace_s=1.0) as init:
        spot = make(driver, image, cluster, "n-spot", user_data=script, spot=True)
        other = make(driver, image, cluster, "n-other", user_data=script, spot=True)
        on_demand = make(driver, image, cluster, "n-od")
        pid = wait_for(lambda: init.running().get(spot.id), msg="user-data never started")
        log = tmp_path / "logs" / f"{spot.id}.log"
        wait_for(lambda: log.exists() and log.read_text().strip(), msg="no output")
        base = log.read_text().strip()                 # what the instance's node asks
        assert base == init.metadata.base_for(spot.id)
        with pytest.raises(ValueError, match="on-demand"):
            devcloud.send_spot_notice(driver, on_demand, time.time() + 60)
        [vm] = [n for n in ec2.list_ours(driver, cluster) if n.id == spot.id]
        at = float(int(time.time()) + 2)
        devcloud.send_spot_notice(driver, vm, at)
        wait_for(lambda: SpotWatch(base).poll() == at, 5, "the notice never served")
        assert SpotWatch(init.metadata.base_for(other.id)).poll() is None   # not its own
        wait_for(lambda: spot.id not in init.running(), 10, "not taken back at its time")
        assert time.time() >= at and not any(n.id == spot.id
                                             for n in ec2.list_ours(driver, cluster))
        wait_for(lambda: not _alive(pid), timeout_s=5, msg=f"pid {pid} outlived its VM")
        assert other.id in init.running()
