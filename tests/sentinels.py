"""A Redis deployment with failover for tests: a primary, a replica and three sentinels,
Debian's redis-server and redis-sentinel as real processes (docker-compose.yml runs the same
shape)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from voicectl import procs

MASTER = "voice"
PASSWORD = "sentinel-test-password"
DOWN_AFTER_MS = 1000   # a primary silent this long is down (the deployment: 5000)
SENTINEL = shutil.which("redis-sentinel")
SERVER = shutil.which("redis-server")


@dataclass
class Sentinels:
    url: str                              # sentinel://...;sentinel://... for connect()
    primary: subprocess.Popen[bytes]
    primary_port: int
    procs: list[subprocess.Popen[bytes]]   # the primary, its replica, three sentinels
    replica_port: int = 0

    def current_primary(self) -> int:
        """The port the sentinels now name as the primary."""
        port = int(self.url.split(";")[0].rsplit(":", 1)[1].split("/")[0])
        with redis.Redis(port=port, decode_responses=True) as s:
            return int(s.sentinel_get_master_addr_by_name(MASTER)[1])


def _conf(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def sentinel_redis(tmp: Path) -> Iterator[Sentinels]:
    assert SERVER and SENTINEL, "apt-get install redis-server redis-sentinel (.ci/run does)"
    ports: list[int] = []
    while len(ports) < 5:   # five different ones (two calls may get the same free port)
        if (port := procs.free_port()) not in ports:
            ports.append(port)
    started: list[subprocess.Popen[bytes]] = []
    try:
        data = ["bind 127.0.0.1", "save ''", "appendonly no", f"requirepass {PASSWORD}",
                f"masterauth {PASSWORD}"]
        for i, port in enumerate(ports[:2]):
            conf = _conf(tmp / f"redis-{i}" / "redis.conf", [
                f"port {port}", f"dir {tmp / f'redis-{i}'}", *data,
                *([f"replicaof 127.0.0.1 {ports[0]}"] if i else [])])
            started.append(procs.spawn([SERVER, str(conf)], log=tmp / f"redis-{i}.log"))
        for i, port in enumerate(ports[2:]):
            conf = _conf(tmp / f"sentinel-{i}" / "sentinel.conf", [
                f"port {port}", "bind 127.0.0.1", f"dir {tmp / f'sentinel-{i}'}",
                f"sentinel monitor {MASTER} 127.0.0.1 {ports[0]} 2",
                f"sentinel auth-pass {MASTER} {PASSWORD}",
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                # a split vote (three sentinels at once, under load) is retried after twice this
                f"sentinel failover-timeout {MASTER} 2000",
                f"sentinel parallel-syncs {MASTER} 1"])
            started.append(procs.spawn([SENTINEL, str(conf)], log=tmp / f"sentinel-{i}.log"))
        _wait_ready(ports)
        url = ";".join(f"sentinel://:{PASSWORD}@127.0.0.1:{p}/0" for p in ports[2:])
        yield Sentinels(url, started[0], ports[0], started, ports[1])
    finally:
        procs.stop(started)


def _wait_ready(ports: list[int]) -> None:
    """The replica in sync, and every sentinel seeing the primary, its replica and the
    other sentinels (a failover needs the quorum)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with redis.Redis(port=ports[1], password=PASSWORD, decode_responses=True) as r:
                synced = r.info("replication").get("master_link_status") == "up"
            seen = []
            for port in ports[2:]:
                with redis.Redis(port=port, decode_responses=True) as s:
                    m = s.sentinel_master(MASTER)
                    seen.append(int(m["num-slaves"]) == 1 and int(m["num-other-sentinels"]) == 2)
            if synced and all(seen):
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        time.sleep(0.1)
    raise RuntimeError("the sentinels never saw the primary, its replica and each other")
