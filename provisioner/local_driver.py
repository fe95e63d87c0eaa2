"""The `local` cloud: a libcloud NodeDriver whose "VMs" are worker_node processes on 127.0.0.1.

Its state lives in Redis (through provisioner.state), so every process, the Celery worker,
the webapp and voicectl, sees the same VMs. Liveness is read from /proc, so a zombie (a
dead child nobody waited for) counts as dead. `boot_s` stands for VM boot time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.types import NodeState as LibcloudState

from provisioner.state import State, connect

ROOT = Path(__file__).resolve().parent.parent


def pid_alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and is ours (its command line names `marker`); zombies are dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
    except OSError:
        return False
    process_state = stat.rsplit(")", 1)[1].split()[0]
    return process_state not in ("Z", "X") and marker in cmdline


class LocalNodeDriver(NodeDriver):  # type: ignore[misc]
    """`key` is the Redis URL. Images are `model:version:semitones`; locations are regions."""

    type = "voice-local"
    name = "Local worker_node processes"
    website = "http://127.0.0.1"

    def __init__(self, key: str, secret: str | None = None, secure: bool = False,
                 host: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, boot_s: float = 1.0,
                 price_per_hour: float = 0.0, log_dir: str | None = None,
                 **kwargs: Any) -> None:
        self.state = State(connect(key))
        self.redis_url = key
        self.env = {**os.environ, **(env or {}), "REDIS_URL": key}
        self.boot_s = boot_s
        self.price_per_hour = price_per_hour
        self.log_dir = Path(log_dir or ROOT / "var" / "logs")
        self.connection = None

    def list_sizes(self, location: NodeLocation | None = None) -> list[NodeSize]:
        return [NodeSize("gpu-local", "local stand-in GPU (4 streams)", ram=0, disk=0,
                         bandwidth=0, price=self.price_per_hour, driver=self)]

    def list_locations(self) -> list[NodeLocation]:
        return []   # any region name works: every region is 127.0.0.1

    def _node(self, vm: dict[str, str]) -> Node:
        alive = pid_alive(int(vm["pid"]), vm["name"])
        return Node(id=vm["name"], name=vm["name"],
                    state=LibcloudState.RUNNING if alive else LibcloudState.TERMINATED,
                    public_ips=["127.0.0.1"], private_ips=["127.0.0.1"], driver=self,
                    extra={k: v for k, v in vm.items() if k != "name"})

    def list_nodes(self) -> list[Node]:
        return [self._node(vm) for vm in self.state.vms()]

    def create_node(self, name: str, size: NodeSize, image: NodeImage,
                    location: NodeLocation | None = None, auth: Any = None,
                    **kwargs: Any) -> Node:
        """Start the node process; idempotent: the same name returns the running VM."""
        for node in self.list_nodes():
            if node.name == name and node.state == LibcloudState.RUNNING:
                return node
        model, version, semitones = image.id.split(":")
        region = location.id if location is not None else "local"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "worker_node", "--node-id", name, "--model", model,
               "--version", version, "--semitones", semitones, "--region", region,
               "--boot-s", str(self.boot_s)]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT, start_new_session=True)
        threading.Thread(target=proc.wait, daemon=True).start()   # reap: no zombies
        vm = {"name": name, "pid": proc.pid, "region": region, "image": image.id,
              "created_at": time.time(), "log": str(log)}
        self.state.save_vm(name, vm)
        return self._node({k: str(v) for k, v in vm.items()})

    def destroy_node(self, node: Node) -> bool:
        """SIGTERM, then SIGKILL after a grace period; forgets the VM either way."""
        pid = int(node.extra.get("pid", 0))
        if pid and pid_alive(pid, node.name):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 3.0
            while pid_alive(pid, node.name) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid, node.name):
                os.kill(pid, signal.SIGKILL)
        self.state.forget_vm(node.name)
        return True
