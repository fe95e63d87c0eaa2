"""A local EC2 for tests and the dev mode: moto's server, a capacity fault injector in front
of it, and a "cloud-init" that boots each instance by running its user-data here.

moto serves the EC2 API and keeps instances as records that run nothing; `CloudInit` turns
each running instance into a local process `sh -c USERDATA` (like a VM booting its
user-data) and kills it when the instance is terminated (like the VM going away). Every
process here is our child through `voicectl.procs.spawn`: none outlives us. A spot
interruption is played with a tag (`send_spot_notice`): the instance's metadata serves the
notice (voicectl/imds.py) and the instance is terminated at its time, as AWS would.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from subprocess import Popen
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from libcloud.compute.base import Node, NodeDriver
from libcloud.compute.drivers.ec2 import NAMESPACE
from libcloud.compute.types import NodeState

from provisioner.clouds import ec2
from voicectl import procs
from voicectl.imds import POLL_SHUTDOWN_S, Metadata, iso_utc

__all__ = ["MOTO_AMI", "FAKE_KEY", "NOTICE_TAG", "start_moto", "default_image",
           "read_user_data", "send_spot_notice", "CapacityFault", "Metadata", "CloudInit",
           "minimal_env"]

log = logging.getLogger(__name__)

# "Ubuntu CUDA9 DLAMI with MXNet/TF/Caffe2", one of the AMIs moto loads into every region
# from its bundled ec2/resources/amis.json (unless MOTO_AMIS_PATH replaces that list).
MOTO_AMI = "ami-9b32e8e2"
FAKE_KEY = "testing"    # moto takes any credentials; these are never real ones
START_TIMEOUT_S = 30.0
NOTICE_TAG = "voice-dev:spot-notice"   # the dev cloud's spot notice: when AWS takes it back


def start_moto(port: int | None = None) -> tuple[str, Popen[bytes]]:
    """moto's EC2 server as our child on 127.0.0.1; returns (endpoint URL, process).

    AMI validation is on, so an unknown `image` fails here as it would on AWS. Call it from
    a thread that outlives your use of moto: the child's death signal (PR_SET_PDEATHSIG)
    fires when the thread that spawned it ends, not only the process."""
    port = port or procs.free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "MOTO_ENABLE_AMI_VALIDATION": "true"}
    proc = procs.spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                        str(port)], env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return endpoint, proc
        except urllib.error.HTTPError:
            return endpoint, proc     # it answered, if only with an error: it is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                procs.stop([proc])
                raise RuntimeError(f"moto_server on port {port} did not answer within "
                                   f"{START_TIMEOUT_S:g} s (exit code {proc.poll()})") from None
            time.sleep(0.1)


def _driver(endpoint: str, region: str) -> NodeDriver:
    return ec2.ec2_driver(region, access_key=FAKE_KEY, secret_key=FAKE_KEY, endpoint=endpoint)


def default_image(endpoint: str, region: str) -> str:
    """An AMI id that RunInstances accepts in `region` of this moto: MOTO_AMI when moto
    loaded its bundled AMIs, else one we register once (by name) and reuse."""
    driver: Any = _driver(endpoint, region)   # EC2's ex_* options are untyped extras
    if driver.list_images(ex_image_ids=[MOTO_AMI]):
        return MOTO_AMI
    name = "voice-dev-node"
    found = driver.list_images(ex_filters={"name": name})
    if found:
        return str(found[0].id)
    body = driver.connection.request("/", params={
        "Action": "RegisterImage", "Name": name, "RootDeviceName": "/dev/sda1",
        "Architecture": "x86_64"}).object
    return str(body.findtext(f"{{{NAMESPACE}}}imageId"))


def read_user_data(driver: NodeDriver, instance_id: str) -> str:
    """The user-data an instance was started with (DescribeInstanceAttribute), decoded."""
    body = driver.connection.request("/", params={  # type: ignore[no-untyped-call]
        "Action": "DescribeInstanceAttribute", "InstanceId": instance_id,
        "Attribute": "userData"}).object
    encoded = body.findtext(f"{{{NAMESPACE}}}userData/{{{NAMESPACE}}}value") or ""
    return base64.b64decode(encoded).decode()


def send_spot_notice(driver: NodeDriver, vm: Node, at: float) -> None:
    """The dev cloud takes the spot instance `vm` back at `at` (unix s): a tag that
    CloudInit reads, so the instance's metadata serves the notice and the instance is
    terminated at `at` (on AWS itself: AWS FIS, aws:ec2:send-spot-instance-interruptions)."""
    if vm.extra.get("instance_lifecycle") != "spot":
        raise ValueError(f"instance {vm.id} ({ec2.node_id(vm)}) is on-demand: EC2 never "
                         "interrupts it; only spot instances get a notice")
    # CreateTags itself: libcloud's ex_create_tags numbers from 0, which moto refuses
    driver.connection.request("/", params={  # type: ignore[no-untyped-call]
        "Action": "CreateTags", "ResourceId.1": vm.id, "Tag.1.Key": NOTICE_TAG,
        "Tag.1.Value": iso_utc(at)})


# --- capacity faults ---------------------------------------------------------------------

_MARKET = "InstanceMarketOptions.MarketType"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length",
               "proxy-connection", "upgrade", "te", "trailer"}


def _capacity_xml(request_id: str) -> bytes:
    """The error document EC2 answers RunInstances with when a zone is out of a type."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        "<Code>InsufficientInstanceCapacity</Code><Message>We currently do not have "
        "sufficient capacity in the Availability Zone you requested. Our system will be "
        "working on provisioning additional capacity. You can currently get capacity by not "
        "specifying an Availability Zone in your request or choosing a different "
        "Availability Zone.</Message></Error></Errors>"
        f"<RequestID>{request_id}</RequestID></Response>").encode()


class CapacityFault:
    """An HTTP proxy before an EC2 endpoint that forwards everything unchanged, except that
    it answers RunInstances with EC2's own `InsufficientInstanceCapacity` error (HTTP 500)
    while `refuse` is True or for the next `refuse_next(n)` calls, and spot RunInstances
    alone while `refuse_spot` is True. Give drivers `.endpoint`.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.refuse = False
        self.refuse_spot = False
        self.refused = 0           # RunInstances calls answered with the error so far
        self._next = 0
        self._lock = threading.Lock()
        fault = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fault._handle(self)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass   # a test's output is not the place for an access log

        self._server = ThreadingHTTPServer(("127.0.0.1", procs.free_port()), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(POLL_SHUTDOWN_S,),
                         name="capacity-fault", daemon=True).start()

    def refuse_next(self, n: int) -> None:
        """Refuse the next `n` RunInstances calls, then forward again."""
        with self._lock:
            self._next = n

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> CapacityFault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _should_refuse(self, action: str, market: str) -> bool:
        if action != "RunInstances":
            return False
        with self._lock:
            if self._next > 0:
                self._next -= 1
            elif not (self.refuse or (self.refuse_spot and market == "spot")):
                return False
            self.refused += 1
            return True

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        query = parse_qs(urlsplit(req.path).query)
        form = parse_qs(body.decode(errors="replace")) if body else {}
        action = (query.get("Action") or form.get("Action") or [""])[0]
        market = (query.get(_MARKET) or form.get(_MARKET) or [""])[0]
        if self._should_refuse(action, market):
            answer(req, 500, {"Content-Type": "text/xml;charset=UTF-8"},
                   _capacity_xml(f"fault-{self.refused}"))
            return
        conn = http.client.HTTPConnection(self.upstream.hostname or "127.0.0.1",
                                          self.upstream.port, timeout=30)
        try:
            conn.request(req.command, req.path, body=body or None,
                         headers={k: v for k, v in req.headers.items()
                                  if k.lower() not in _HOP_BY_HOP})
            resp = conn.getresponse()
            data = resp.read()
            headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
            answer(req, resp.status, headers, data)
        finally:
            conn.close()


def answer(req: BaseHTTPRequestHandler, status: int, headers: Mapping[str, str],
           body: bytes) -> None:
    """Answer an HTTP request of one of this module's fake services."""
    req.send_response(status)
    for k, v in headers.items():
        req.send_header(k, v)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


# --- cloud-init --------------------------------------------------------------------------

POLL_S = 0.3
GRACE_S = 3.0    # SIGTERM, then SIGKILL: like a VM's shutdown


def minimal_env(**extra: str) -> dict[str, str]:
    """What a fresh VM with the project installed would have: PATH (our venv's bin first,
    so the user-data finds this checkout's `voicectl`), HOME, LANG; plus `extra`."""
    path = os.pathsep.join([str(Path(sys.executable).parent),
                            os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
    return {"PATH": path, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            **extra}


class CloudInit:
    """Boots the instances of a moto endpoint as local processes, for tests and dev mode.

    Every `poll_s` it lists the running instances (only `cluster`'s, when given); a new one
    has its user-data read (DescribeInstanceAttribute) and run once as `sh -c USERDATA` with
    `env` only (not our environment) and the address of its instance metadata service
    (`VOICE_METADATA_URL`: `public_ip`, loopback, all 127/8 reaches this machine; its spot
    notice), its output in `log_dir/INSTANCE_ID.log`. A spot notice (`send_spot_notice`)
    is served to the instance from the next pass, and at its time the instance is
    terminated, as AWS takes a spot instance back. When the instance is terminated or
    disappears its process gets SIGTERM, then SIGKILL after `grace_s`. `stop()` ends all.
    """

    def __init__(self, endpoint: str, region: str, *, log_dir: Path,
                 cluster: str | None = None, env: Mapping[str, str] | None = None,
                 poll_s: float = POLL_S, grace_s: float = GRACE_S,
                 public_ip: str = "127.0.0.1") -> None:
        self.driver = _driver(endpoint, region)
        self.cluster = cluster
        self.metadata = Metadata(public_ip)
        self.env = dict(env) if env is not None else minimal_env()
        self.log_dir = log_dir
        self.poll_s = poll_s
        self.grace_s = grace_s
        self._procs: dict[str, Popen[bytes]] = {}
        self._booted: set[str] = set()     # each instance runs its user-data once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cloud-init", daemon=True)

    def start(self) -> CloudInit:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            left = list(self._procs.values())
            self._procs.clear()
        procs.stop(left, timeout_s=self.grace_s)
        self.metadata.close()

    def running(self) -> dict[str, int]:
        """instance id -> pid of each user-data process still running."""
        with self._lock:
            return {i: p.pid for i, p in self._procs.items() if p.poll() is None}

    def __enter__(self) -> CloudInit:
        return self.start()

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def sync(self) -> None:
        """One pass: serve spot notices, take back instances whose notice is due, boot new
        running instances, kill processes of gone ones."""
        if self.cluster is not None:
            nodes = ec2.list_ours(self.driver, self.cluster)
        else:
            nodes = [n for n in self.driver.list_nodes() if not ec2.is_gone(n)]
        nodes = self._interrupt(nodes, time.time())
        up = {str(n.id) for n in nodes if n.state == NodeState.RUNNING}
        alive = {str(n.id) for n in nodes}      # pending counts as not gone yet
        for instance_id in sorted(up - self._booted):
            self._boot(instance_id)
        with self._lock:
            gone = [i for i in self._procs if i not in alive]
            doomed = [self._procs.pop(i) for i in gone]
        for p in doomed:
            # off this thread: a slow shutdown must not hold up the other instances
            threading.Thread(target=procs.stop, args=([p], self.grace_s), daemon=True).start()

    def _interrupt(self, nodes: list[Node], now: float) -> list[Node]:
        """Serve each instance's spot notice; terminate those whose time has come."""
        notices = {}
        for n in nodes:
            raw = n.extra.get("tags", {}).get(NOTICE_TAG)
            if raw:
                notices[str(n.id)] = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        self.metadata.notices = notices
        due = {str(n.id) for n in nodes if notices.get(str(n.id), now + 1) <= now}
        for n in nodes:
            if str(n.id) in due:
                log.info("cloud-init: spot instance %s taken back (its notice's time)", n.id)
                self.driver.destroy_node(n)
        return [n for n in nodes if str(n.id) not in due]

    def _boot(self, instance_id: str) -> None:
        self._booted.add(instance_id)
        script = read_user_data(self.driver, instance_id)
        if not script:
            return     # an instance without user-data boots and runs nothing of ours
        # spawned from the loop thread, so a node dies with this CloudInit (PDEATHSIG follows
        # the spawning thread) as well as with our process
        env = {**self.env, "VOICE_METADATA_URL": self.metadata.base_for(instance_id)}
        proc = procs.spawn(["sh", "-c", script], env=env,
                           log=self.log_dir / f"{instance_id}.log")
        with self._lock:
            self._procs[instance_id] = proc

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:   # a thread's boundary: a moto hiccup must not end the loop
                log.exception("cloud-init: listing %s failed; trying again",
                              self.driver.connection.host)
            self._stop.wait(self.poll_s)
