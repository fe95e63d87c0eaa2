"""Where browsers reach this machine, asked of the cloud's instance metadata service.

A VM's own network interface holds only its private address; the public one (EC2's
public IPv4, GCE's access config, Azure's public IP) is known to the metadata service
at 169.254.169.254, which all three clouds serve (each with its own paths and headers).
`voicectl node --public-url auto` asks it, so a cloud node announces an address browsers
can open. `VOICE_METADATA_URL` points elsewhere (the dev cloud serves one on loopback).
A spot VM also learns there that its provider takes it back (`SpotWatch`, `watch_spot`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime

import requests

__all__ = ["DEFAULT_METADATA_URL", "MetadataError", "public_address", "SpotWatch",
           "parse_instance_action", "watch_spot"]

log = logging.getLogger("worker_node.metadata")

DEFAULT_METADATA_URL = "http://169.254.169.254"
TIMEOUT_S = 2.0     # the service is on the host: it answers in milliseconds or not at all
TOKEN_TTL_S = 60
WATCH_TOKEN_TTL_S = 21600   # the watch keeps its IMDSv2 token this long (EC2's maximum)
INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"


class MetadataError(Exception):
    """Raised when no instance metadata service answered with this machine's address."""


def _ec2(base: str, session: requests.Session) -> str:
    # IMDSv2 first (v1 may be switched off); a service without tokens answers the GET alone
    headers = {}
    try:
        r = session.put(f"{base}/latest/api/token", timeout=TIMEOUT_S,
                        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        if r.ok:
            headers["X-aws-ec2-metadata-token"] = r.text
    except requests.RequestException:
        pass
    for path in ("public-ipv4", "local-ipv4"):      # no public address: a private network
        r = session.get(f"{base}/latest/meta-data/{path}", headers=headers, timeout=TIMEOUT_S)
        if r.ok and r.text.strip():
            return r.text.strip()
    return ""


def _gce(base: str, session: requests.Session) -> str:
    r = session.get(f"{base}/computeMetadata/v1/instance/network-interfaces/0/access-configs/0/"
                    "external-ip", headers={"Metadata-Flavor": "Google"}, timeout=TIMEOUT_S)
    return r.text.strip() if r.ok else ""


def _azure(base: str, session: requests.Session) -> str:
    r = session.get(f"{base}/metadata/instance/network/interface/0/ipv4/ipAddress/0/"
                    "publicIpAddress", params={"api-version": "2021-02-01", "format": "text"},
                    headers={"Metadata": "true"}, timeout=TIMEOUT_S)
    return r.text.strip() if r.ok else ""


def public_address(base: str = DEFAULT_METADATA_URL) -> str:
    """This machine's public IP address (else its private one, on EC2) from the metadata
    service at `base`: EC2's paths (IMDSv2, then v1), then GCE's, then Azure's."""
    base = base.rstrip("/")
    tried = []
    with requests.Session() as session:
        for name, ask in (("EC2", _ec2), ("GCE", _gce), ("Azure", _azure)):
            try:
                address = ask(base, session)
            except requests.RequestException as e:
                tried.append(f"{name}: {type(e).__name__}")
                continue
            if address:
                return address
            tried.append(f"{name}: no address")
    raise MetadataError(
        f"the instance metadata service at {base} gave no address ({'; '.join(tried)}); "
        "on a machine that is not a cloud VM, pass --public-url ws://HOST:PORT")


def parse_instance_action(text: str) -> float:
    """The unix time of an EC2 `spot/instance-action` notice, e.g.
    {"action": "terminate", "time": "2026-12-07T14:02:00Z"} (stop and hibernate too: the
    machine goes away all the same), or MetadataError naming what was wrong."""
    try:
        notice = json.loads(text)
        when = datetime.fromisoformat(str(notice["time"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError) as e:
        raise MetadataError(f"spot/instance-action answered {text[:120]!r} ({e}), not "
                            '{"action": ..., "time": "YYYY-MM-DDTHH:MM:SSZ"}') from None
    if when.tzinfo is None:
        raise MetadataError(f"spot/instance-action time {notice['time']!r} has no time zone; "
                            "EC2 gives UTC (...Z)")
    return when.timestamp()


class SpotWatch:
    """Asks EC2's instance metadata at `base` whether this spot machine is being taken back
    (`spot/instance-action`: 404 normally, a notice two minutes ahead), with an IMDSv2
    token it keeps and renews when refused."""

    def __init__(self, base: str = DEFAULT_METADATA_URL) -> None:
        self.base = base.rstrip("/")
        self.session = requests.Session()
        self._token = ""

    def _get(self) -> requests.Response:
        if not self._token:
            try:
                r = self.session.put(f"{self.base}/latest/api/token", timeout=TIMEOUT_S, headers={
                    "X-aws-ec2-metadata-token-ttl-seconds": str(WATCH_TOKEN_TTL_S)})
                self._token = r.text if r.ok else ""
            except requests.RequestException:
                pass   # IMDSv1 may answer the GET alone
        headers = {"X-aws-ec2-metadata-token": self._token} if self._token else {}
        return self.session.get(self.base + INSTANCE_ACTION, headers=headers,
                                timeout=TIMEOUT_S)

    def poll(self) -> float | None:
        """When the provider takes this machine back (unix s), or None while there is no
        notice; MetadataError when the service does not answer as EC2's does."""
        try:
            r = self._get()
            if r.status_code == 401:   # the token expired or the service restarted
                self._token = ""
                r = self._get()
        except requests.RequestException as e:
            raise MetadataError(f"no instance metadata at {self.base} ({type(e).__name__})"
                                ) from None
        if r.status_code == 404:
            return None
        if not r.ok:
            raise MetadataError(f"{self.base}{INSTANCE_ACTION} answered HTTP {r.status_code}")
        return parse_instance_action(r.text)


def watch_spot(watch: SpotWatch, interval_s: float, on_notice: Callable[[float], None],
               stop: threading.Event) -> threading.Thread:
    """Poll `watch` every `interval_s` until `stop`; call `on_notice(at)` when a notice
    appears or its time changes. A failing service is logged once, not at every poll."""
    def run() -> None:
        seen: float | None = None
        failing = False
        while not stop.is_set():
            try:
                at = watch.poll()
                if failing:
                    log.info("instance metadata answers again")
                failing = False
                if at is not None and at != seen:
                    seen = at
                    on_notice(at)
            except MetadataError as e:
                if not failing:
                    log.warning("spot notices unknown for now: %s; polling on quietly", e)
                failing = True
            stop.wait(interval_s)

    thread = threading.Thread(target=run, name="spot-watch", daemon=True)
    thread.start()
    return thread
