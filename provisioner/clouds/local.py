"""The `local` cloud: a libcloud NodeDriver whose "VMs" are processes on 127.0.0.1.

A VM runs its user-data, as a cloud VM would: `sh` runs the boot script (which ends with
`exec voicectl node --join ...`) after `boot_s` (standing for VM boot time), with a small
environment of its own (PATH to this Python's scripts; not our environment: a node holds no
secrets of the control plane). The driver's state lives in Redis (through provisioner.state),
so every process, the Celery worker, the webapp and voicectl, sees the same VMs. Liveness is
read from /proc, so a zombie (a dead child nobody waited for) counts as dead. A region may
have a quota (`max_nodes`): creating past it fails with a libcloud error, as a cloud's would.
The driver is registered with libcloud as `voice-local`; tags are kept as given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.providers import get_driver, set_driver
from libcloud.compute.types import NodeState as LibcloudState

from common.config import Config, Provider, Region
from common.errors import ConfigError
from provisioner.clouds.protocol import CLUSTER_TAG, NODE_TAG
from provisioner.state import State, connect

ROOT = Path(__file__).resolve().parents[2]
LOCAL = "voice-local"   # our driver's name in libcloud's registry
CAPACITY_CODES = frozenset({"InstanceLimitExceeded"})   # past a region's max_nodes


def register() -> None:
    """Register our driver with libcloud once (set_driver raises on a second call)."""
    try:
        get_driver(LOCAL)
    except AttributeError:
        # libcloud's type comment asks for the module and class: it takes their names
        set_driver(LOCAL, __name__, "LocalNodeDriver")  # type: ignore[arg-type]


def make_driver(cfg: Config, provider: Provider, region: Region) -> NodeDriver:
    """One driver for every local region (their quotas inside), shared per arguments."""
    if not cfg.redis_url:
        raise ConfigError("the local cloud keeps its VMs in Redis: set REDIS_URL")
    quotas = tuple(sorted((r.name, r.max_nodes) for r in cfg.regions
                          if r.provider == provider.name and r.max_nodes is not None))
    return _driver(cfg.redis_url, provider.boot_s, quotas)


@lru_cache(maxsize=64)
def _driver(redis_url: str, boot_s: float, max_nodes: tuple[tuple[str, int], ...]
            ) -> NodeDriver:
    register()
    return get_driver(LOCAL)(redis_url, boot_s=boot_s, max_nodes=dict(max_nodes))


def create(driver: NodeDriver, *, name: str, user_data: str, tags: Mapping[str, str],
           instance_type: str, image: str, location: str, spot: bool,
           options: Mapping[str, Any]) -> Node:
    """A "VM" in region `location` running `user_data`; the same name returns the running
    one. Every local VM is the one stand-in size and this checkout: type and image are
    not read."""
    ours: Any = driver   # NodeDriver's create_node types no ex_* arguments
    made: Node = ours.create_node(name=name, size=driver.list_sizes()[0],
                                  image=NodeImage("voice-node", "voice worker node", driver),
                                  location=NodeLocation(location, location, "", driver),
                                  ex_userdata=user_data, ex_metadata=dict(tags))
    return made


def list_ours(driver: NodeDriver, cluster: str) -> list[Node]:
    return [n for n in driver.list_nodes() if n.extra["tags"].get(CLUSTER_TAG) == cluster]


def destroy(driver: NodeDriver, node: Node) -> bool:
    return bool(driver.destroy_node(node))


def node_id(vm: Node) -> str:
    return str(vm.extra["tags"].get(NODE_TAG) or vm.name)


def start_ticks(pid: int) -> str:
    """When the process started (clock ticks since boot): with the pid, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def pid_alive(pid: int, started: str) -> bool:
    """True if `pid` runs and is the process we started (a reused pid is not); zombies
    are dead. The VM's process execs into the node, so its command line changes: the start
    time does not."""
    return bool(started) and start_ticks(pid) == started


class LocalNodeDriver(NodeDriver):
    """`key` is the Redis URL; locations are region names; the image is ignored (every
    "VM" runs this checkout's Python)."""

    type = "local"   # the config's driver name: which module reads a Node's tags
    name = "Local worker_node processes"
    website = "http://127.0.0.1"

    def __init__(self, key: str, secret: str | None = None, secure: bool = False,
                 host: str | None = None, port: int | None = None,
                 boot_s: float = 1.0, max_nodes: dict[str, int] | None = None,
                 log_dir: str | None = None, **kwargs: Any) -> None:
        self.state = State(connect(key))
        self.boot_s = boot_s
        self.max_nodes = dict(max_nodes or {})
        self.log_dir = Path(log_dir or ROOT / "var" / "logs")
        bindir = str(Path(sys.executable).parent)
        self.env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
                    "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
        self.connection = None  # type: ignore[assignment]  # no HTTP: the VMs are in Redis

    def list_sizes(self, location: NodeLocation | None = None) -> list[NodeSize]:
        return [NodeSize("gpu-local", "local stand-in GPU (4 streams)", ram=0, disk=0,
                         bandwidth=0, price=0.0, driver=self)]

    def list_locations(self) -> list[NodeLocation]:
        return []   # any region name works: every region is 127.0.0.1

    def _node(self, vm: dict[str, str]) -> Node:
        alive = pid_alive(int(vm["pid"]), vm.get("started", ""))
        return Node(id=vm["name"], name=vm["name"],
                    state=LibcloudState.RUNNING if alive else LibcloudState.TERMINATED,
                    public_ips=["127.0.0.1"], private_ips=["127.0.0.1"], driver=self,
                    extra={**{k: v for k, v in vm.items() if k not in ("name", "tags")},
                           "tags": json.loads(vm.get("tags") or "{}")})

    def list_nodes(self) -> list[Node]:
        return [self._node(vm) for vm in self.state.vms()]

    def create_node(self, name: str, size: NodeSize, image: NodeImage,
                    location: NodeLocation | None = None, auth: Any = None,
                    ex_userdata: str = "", ex_metadata: dict[str, str] | None = None,
                    **kwargs: Any) -> Node:
        """Boot a "VM" that runs `ex_userdata`; idempotent: the same name returns the
        running VM. Past the region's quota, raises like a cloud out of capacity."""
        running = [n for n in self.list_nodes() if n.state == LibcloudState.RUNNING]
        for node in running:
            if node.name == name:
                return node
        region = location.id if location is not None else "local"
        quota = self.max_nodes.get(region)
        if quota is not None and sum(n.extra.get("region") == region for n in running) >= quota:
            raise LibcloudError(f"InstanceLimitExceeded: region {region} allows {quota} "
                                "node(s) (max_nodes in the config)", driver=self)
        if not ex_userdata.startswith("#!"):
            raise LibcloudError("ex_userdata must be a boot script (#!/bin/sh ...)", driver=self)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        script = self.log_dir / f"{name}.user-data.sh"
        script.write_text(ex_userdata)
        cmd = ["sh", "-c", f'sleep {self.boot_s}; exec sh "$0"', str(script)]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT, start_new_session=True)
        threading.Thread(target=proc.wait, daemon=True).start()   # reap: no zombies
        vm = {"name": name, "pid": proc.pid, "started": start_ticks(proc.pid),
              "region": region, "image": image.id,
              "created_at": time.time(), "log": str(log),
              "tags": json.dumps(ex_metadata or {})}
        self.state.save_vm(name, vm)
        return self._node({k: str(v) for k, v in vm.items()})

    def destroy_node(self, node: Node) -> bool:
        """SIGTERM, then SIGKILL after a grace period; forgets the VM either way."""
        pid, started = int(node.extra.get("pid", 0)), str(node.extra.get("started", ""))
        if pid and pid_alive(pid, started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 3.0
            while pid_alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid, started):
                os.kill(pid, signal.SIGKILL)
        self.state.forget_vm(node.name)
        return True
