"""GCE, Azure ARM and OpenStack through the clouds seam, against the recorded API answers that
libcloud ships for its own tests (its fixtures and MockHttp classes: no network, no sleep).

For each cloud: `create` asks for the instance type by its name (not the first one the cloud
lists) and sends the user-data and our tags in that cloud's idiom; `list_ours`, what the
sweep destroys, finds our machines and no one else's; a capacity refusal is CapacityError.
Where the shipped recordings hold no machine of ours, the mock answers with its shipped
recording plus copies of a machine carrying our tags (or another cluster's)."""

from __future__ import annotations

import base64
import copy
import datetime
import json
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import libcloud.test
import pytest

# libcloud's test modules import `libcloud.test.secrets`, which its CI copies from the
# secrets.py-dist it ships (fake credentials); the same, without writing into site-packages.
_secrets = types.ModuleType("libcloud.test.secrets")
exec(Path(libcloud.test.__file__).with_name("secrets.py-dist").read_text(), _secrets.__dict__)
sys.modules.setdefault("libcloud.test.secrets", _secrets)

from libcloud.common.azure_arm import AzureResourceManagementConnection  # noqa: E402
from libcloud.compute.drivers.gce import GCENodeDriver  # noqa: E402
from libcloud.compute.drivers.openstack import OpenStack_2_NodeDriver  # noqa: E402
from libcloud.test.compute.test_azure_arm import AzureMockHttp  # noqa: E402
from libcloud.test.compute.test_gce import GCEMockHttp  # noqa: E402
from libcloud.test.compute.test_openstack import OpenStack_2_0_MockHttp  # noqa: E402

from common.config import Config, Region, parse_config  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from provisioner import clouds  # noqa: E402
from provisioner.clouds import gce  # noqa: E402
from provisioner.errors import CapacityError  # noqa: E402

SCRIPT = "#!/bin/sh\nexec voicectl node --join https://cp.example --token j-1\n"
CLUSTER = "Voice-T1"     # GCE labels hold no capitals: compared as "voice-t1"
Answer = tuple[int, str, dict[str, str], str]


def config(provider: str, provider_region: str) -> tuple[Config, Region]:
    """One provider table (TOML lines) serving one region, read as the config file is."""
    cfg = parse_config(tomllib.loads(f"""
[settings]
cluster = "{CLUSTER}"

[providers.cloud]
price_per_hour = "1.00"
{provider}

[[regions]]
name = "r1"
provider = "cloud"
provider_region = "{provider_region}"
lat = 0.0
lon = 0.0

[[models]]
package = "models/miku"
"""), "test")
    region = cfg.region("r1")
    assert region is not None
    return cfg, region


def tagged(vm: dict[str, Any], name: str, key: str, tags: dict[str, str]) -> dict[str, Any]:
    """A copy of a recorded machine named `name`, with `tags` under `key`."""
    return {**copy.deepcopy(vm), "name": name, key: tags}


@pytest.fixture(autouse=True)
def recorded_clouds() -> Iterator[None]:
    """libcloud's drivers talk to the recordings below, each test from a clean slate."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GCENodeDriver.connectionCls, "conn_class", GCEHttp)
        mp.setattr(AzureResourceManagementConnection, "conn_class", AzureHttp)
        mp.setattr(OpenStack_2_NodeDriver.connectionCls, "conn_class", OpenStackHttp)
        mp.setattr(GCEHttp, "refuse", "")
        mp.setattr(AzureHttp, "refuse", "")
        mp.setattr(OpenStackHttp, "refuse", False)
        for http in (GCEHttp, AzureHttp, OpenStackHttp):
            http.sent.clear()
        yield


# --- GCE --------------------------------------------------------------------------------

class GCEHttp(GCEMockHttp):
    """libcloud's GCE recordings; also keeps what it was sent, lists our instances beside
    the shipped one, and fails the insert operation with `refuse`'s code when set."""

    sent: ClassVar[list[tuple[str, str, str]]] = []
    refuse: ClassVar[str] = ""

    def _get_request(self, method: str, url: str, body: Any = None,
                     headers: Any = None) -> Answer:
        path = urlsplit(url).path
        GCEHttp.sent.append((method, path, body or ""))
        # n-ours is a copy of the recorded node-name: it is deleted the same way
        status, text, hdrs, reason = super()._get_request(
            method, url.replace("/instances/n-ours", "/instances/node-name"), body, headers)
        if method == "GET" and path.endswith("/zones/us-central1-a/instances"):
            listing = json.loads(text)
            [shipped] = listing["items"]             # no labels: someone else's
            ours = gce.labels(clouds.tags_for(config(GCE, "us-central1-a")[0], "n-ours", "p"))
            listing["items"] = [shipped, tagged(shipped, "n-ours", "labels", ours),
                                tagged(shipped, "n-theirs", "labels", {**ours,
                                                                       "voice-cluster": "x"})]
            text = json.dumps(listing)
        if GCEHttp.refuse and "/operations/operation-zones_us-central1-a_instances" in path:
            text = json.dumps({**json.loads(text), "error": {"errors": [{
                "code": GCEHttp.refuse, "message": "The zone 'us-central1-a' does not have "
                "enough resources available to fulfill the request."}]}})
        return status, text, hdrs, reason


def gce_token(tmp_path: Path) -> Path:
    """A cached, unexpired OAuth token where libcloud looks first: no auth round trip."""
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    path = tmp_path / "gce-token.json"
    path.write_text(json.dumps({"access_token": "t", "token_type": "Bearer",
                                "expire_time": later.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    return path


GCE = """driver = "gce"
instance_type = "n1-standard-1"
image = "debian-7"
spot = true
project = "project_name"
user_id = "client_id"
key = "client_secret"
auth_type = "IA"
"""


def gce_config(tmp_path: Path) -> tuple[Config, Region]:
    return config(GCE + f'credential_file = "{gce_token(tmp_path)}"', "us-central1-a")


def test_gce_create_names_the_machine_type_with_startup_script_and_labels(
        tmp_path: Path) -> None:
    cfg, region = gce_config(tmp_path)
    assert clouds.driver_for(cfg, region).list_sizes()[0].name == "f1-micro"
    vm = clouds.create(cfg, region, "node-name", SCRIPT,
                       clouds.tags_for(cfg, "node-name", "miku|1|r1"), spot=True)
    [sent] = [json.loads(body) for method, path, body in GCEHttp.sent
              if method == "POST" and path.endswith("/zones/us-central1-a/instances")]
    assert sent["machineType"].endswith("/zones/us-central1-a/machineTypes/n1-standard-1")
    assert sent["metadata"]["items"] == [{"key": "startup-script", "value": SCRIPT}]
    assert sent["labels"] == {"voice-cluster": "voice-t1", "voice-pool": "miku_1_r1",
                              "voice-node": "node-name", "name": "node-name"}
    assert sent["scheduling"]["preemptible"] is True          # a spot boot
    assert vm.name == clouds.node_id_of(vm) == "node-name"


def test_gce_sweep_sees_and_destroys_only_our_labelled_instances(tmp_path: Path) -> None:
    cfg, region = gce_config(tmp_path)
    assert [vm.name for vm in clouds.driver_for(cfg, region).list_nodes()] == [
        "node-name", "n-ours", "n-theirs"]
    [vm] = clouds.list_ours(cfg, region)
    assert clouds.node_id_of(vm) == "n-ours"
    clouds.destroy(cfg, region, vm)
    assert [path for method, path, _ in GCEHttp.sent if method == "DELETE"] == [
        "/compute/v1/projects/project_name/zones/us-central1-a/instances/n-ours"]


@pytest.mark.parametrize("code", ["ZONE_RESOURCE_POOL_EXHAUSTED", "QUOTA_EXCEEDED"])
def test_gce_out_of_resources_or_quota_is_a_capacity_error(tmp_path: Path, code: str) -> None:
    cfg, region = gce_config(tmp_path)
    GCEHttp.refuse = code
    with pytest.raises(CapacityError, match="n1-standard-1 in r1 .us-central1-a.") as e:
        clouds.create(cfg, region, "node-name", SCRIPT, clouds.tags_for(cfg, "node-name", "p"))
    assert (e.value.code, e.value.provider_region) == (code, "us-central1-a")


@pytest.mark.parametrize("text, as_label", [
    ("voice:cluster", "voice-cluster"), ("miku|1|us-west", "miku_1_us-west"),
    ("Voice-T1", "voice-t1"), ("n-" + "x" * 70, "n-" + "x" * 61)])
def test_gce_label_keeps_to_lowercase_letters_digits_dash_underscore(
        text: str, as_label: str) -> None:
    assert gce.label(text) == as_label


# --- Azure ------------------------------------------------------------------------------

class AzureHttp(AzureMockHttp):
    """libcloud's Azure recordings (a PUT answers with the recording updated by the body
    sent); also keeps what it was sent, tags the listed VMs (ours: test-node-1 in eastus
    and a copy in westus; another cluster's: test-node-2), and refuses a VM with `refuse`."""

    sent: ClassVar[list[tuple[str, str, str]]] = []
    refuse: ClassVar[str] = ""

    def _get_request(self, method: str, url: str, body: Any = None,
                     headers: Any = None) -> Answer:
        path = urlsplit(url).path
        AzureHttp.sent.append((method, path, body or ""))
        if AzureHttp.refuse and method == "PUT" and "/virtualMachines/" in path:
            return (409, json.dumps({"error": {"code": AzureHttp.refuse, "message":
                    "The requested VM size Standard_NC4as_T4_v3 is currently not available "
                    "in location 'eastus'."}}), {"content-type": "application/json"},
                    "Conflict")
        status, text, hdrs, reason = super()._get_request(method, url, body, headers)
        if method == "GET" and path.endswith("/providers/Microsoft.Compute/virtualMachines"):
            page = json.loads(text)
            cfg = config(AZURE, "eastus")[0]
            for vm in list(page["value"]):
                tags = clouds.tags_for(cfg, vm["name"], "p")
                if vm["name"] == "test-node-1":
                    vm["tags"] = tags
                    page["value"].append({**tagged(vm, "test-node-1w", "tags", tags),
                                          "location": "westus"})
                else:
                    vm["tags"] = {**tags, clouds.TAG_CLUSTER: "someone-else"}
            text = json.dumps(page)
        return status, text, hdrs, reason


AZURE = """driver = "azure_arm"
instance_type = "Standard_NC4as_T4_v3"
image = "Canonical:0001-com-ubuntu-server-jammy:22_04-lts-gen2:latest"
tenant_id = "77777777-7777-7777-7777-777777777777"
subscription_id = "99999999"
key = "55555555-5555-5555-5555-555555555555"
secret = "p4ssw0rd"
resource_group = "000000"
network = "vnet"
"""


def test_azure_create_names_the_size_with_custom_data_and_tags() -> None:
    cfg, region = config(AZURE, "eastus")
    tags = clouds.tags_for(cfg, "test-node-1", "miku|1|r1")
    vm = clouds.create(cfg, region, "test-node-1", SCRIPT, tags)
    [sent] = [json.loads(body) for method, path, body in AzureHttp.sent
              if method == "PUT" and path.endswith("/virtualMachines/test-node-1")]
    assert sent["properties"]["hardwareProfile"]["vmSize"] == "Standard_NC4as_T4_v3"
    assert base64.b64decode(sent["properties"]["osProfile"]["customData"]).decode() == SCRIPT
    assert sent["tags"] == tags and sent["location"] == "eastus"
    assert sent["properties"]["storageProfile"]["imageReference"] == {
        "publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy",
        "sku": "22_04-lts-gen2", "version": "latest"}
    assert any(method == "PUT" and path.endswith("/networkInterfaces/test-node-1-nic")
               for method, path, _ in AzureHttp.sent)       # a NIC of its own on `network`
    assert clouds.node_id_of(vm) == "test-node-1"


def test_azure_sweep_sees_only_our_tagged_vms_in_its_location() -> None:
    cfg, region = config(AZURE, "eastus")
    listed = clouds.driver_for(cfg, region).list_nodes(ex_fetch_nic=False,
                                                         ex_fetch_power_state=False)
    assert sorted(vm.name for vm in listed) == ["test-node-1", "test-node-1w", "test-node-2"]
    assert [clouds.node_id_of(vm) for vm in clouds.list_ours(cfg, region)] == ["test-node-1"]


@pytest.mark.parametrize("code", ["SkuNotAvailable", "AllocationFailed"])
def test_azure_size_not_available_is_a_capacity_error(code: str) -> None:
    cfg, region = config(AZURE, "eastus")
    AzureHttp.refuse = code
    with pytest.raises(CapacityError, match=f"\\[{code}\\]") as e:
        clouds.create(cfg, region, "test-node-1", SCRIPT,
                      clouds.tags_for(cfg, "test-node-1", "p"))
    assert (e.value.code, e.value.instance_type) == (code, "Standard_NC4as_T4_v3")


# --- OpenStack --------------------------------------------------------------------------

class OpenStackHttp(OpenStack_2_0_MockHttp):
    """libcloud's OpenStack recordings (Keystone 2.0, Nova); also keeps what it was sent,
    lists server 12064 as ours (node n-ours), a copy as another cluster's and 12065 with no
    metadata, and refuses a server with Nova's quota message when `refuse` is set."""

    sent: ClassVar[list[tuple[str, str, str]]] = []
    refuse: ClassVar[bool] = False

    def _get_request(self, method: str, url: str, body: Any = None,
                     headers: Any = None) -> Answer:
        path = urlsplit(url).path
        OpenStackHttp.sent.append((method, path, body or ""))
        if OpenStackHttp.refuse and method == "POST" and path.endswith("/servers"):
            return (403, json.dumps({"forbidden": {"code": 403, "message":
                    "Quota exceeded for instances: Requested 1, but already used 10 of 10 "
                    "instances"}}), {"content-type": "application/json"}, "Forbidden")
        status, text, hdrs, reason = super()._get_request(method, url, body, headers)
        if method == "GET" and path.endswith("/servers/detail"):
            listing = json.loads(text)
            ours = clouds.tags_for(config(OPENSTACK, "RegionOne")[0], "n-ours", "p")
            for server in listing["servers"]:
                if str(server["id"]) == "12064":
                    server["metadata"] = ours
                    listing["servers"].append({
                        **tagged(server, "n-theirs", "metadata",
                                 {**ours, clouds.TAG_CLUSTER: "someone-else"}), "id": "12063"})
                    break
            text = json.dumps(listing)
        return status, text, hdrs, reason


OPENSTACK = """driver = "openstack"
instance_type = "512 slice"
image = "4949f9ee-2421-4c81-8b49-13119446008b"
auth_url = "https://auth.api.example.com"
auth_version = "2.0"
user = "user_name"
password = "api_key"
tenant = "tenant_name"
security_groups = ["voice-nodes"]
"""


def test_openstack_create_names_the_flavor_with_user_data_and_metadata() -> None:
    cfg, region = config(OPENSTACK, "RegionOne")
    assert clouds.driver_for(cfg, region).list_sizes()[0].name == "15.5GB slice"
    tags = clouds.tags_for(cfg, "racktest", "miku|1|r1")
    vm = clouds.create(cfg, region, "racktest", SCRIPT, tags)
    [sent] = [json.loads(body)["server"] for method, path, body in OpenStackHttp.sent
              if method == "POST" and path.endswith("/servers")]
    assert sent["flavorRef"] == "2"                          # "512 slice"
    assert sent["imageRef"] == "4949f9ee-2421-4c81-8b49-13119446008b"
    assert base64.b64decode(sent["user_data"]).decode() == SCRIPT
    assert sent["metadata"] == tags
    assert sent["security_groups"] == [{"name": "voice-nodes"}]
    assert vm.name == "racktest"


def test_openstack_sweep_sees_and_destroys_only_servers_with_our_metadata() -> None:
    cfg, region = config(OPENSTACK, "RegionOne")
    assert sorted(vm.id for vm in clouds.driver_for(cfg, region).list_nodes()) == [
        "12063", "12064", "12065"]
    [vm] = clouds.list_ours(cfg, region)
    assert (vm.id, clouds.node_id_of(vm)) == ("12064", "n-ours")
    OpenStackHttp.sent.clear()
    clouds.destroy(cfg, region, vm)
    assert [(m, p) for m, p, _ in OpenStackHttp.sent] == [("DELETE", "/v2/1337/servers/12064")]


def test_openstack_retried_create_returns_the_server_it_made() -> None:
    """Nova allows two servers of one name: a retry must not boot (and bill) a second."""
    cfg, region = config(OPENSTACK, "RegionOne")
    vm = clouds.create(cfg, region, "n-ours", SCRIPT, clouds.tags_for(cfg, "n-ours", "p"))
    assert vm.id == "12064"
    assert not [path for method, path, _ in OpenStackHttp.sent if method == "POST"]


def test_openstack_quota_exceeded_is_a_capacity_error() -> None:
    cfg, region = config(OPENSTACK, "RegionOne")
    OpenStackHttp.refuse = True
    with pytest.raises(CapacityError, match="Quota exceeded for instances") as e:
        clouds.create(cfg, region, "racktest", SCRIPT, clouds.tags_for(cfg, "racktest", "p"))
    assert (e.value.code, e.value.provider_region) == ("Quota exceeded", "RegionOne")


def test_azure_and_openstack_refuse_spot_in_the_config() -> None:
    for table in (AZURE, OPENSTACK):
        with pytest.raises(ConfigError, match="makes no spot machines"):
            config(table + "spot = true\n", "eastus")
