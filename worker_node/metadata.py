"""Where browsers reach this machine, asked of the cloud's instance metadata service.

A VM's own network interface holds only its private address; the public one (EC2's
public IPv4, GCE's access config, Azure's public IP) is known to the metadata service
at 169.254.169.254, which all three clouds serve (each with its own paths and headers).
`voicectl node --public-url auto` asks it, so a cloud node announces an address browsers
can open. `VOICE_METADATA_URL` points elsewhere (the dev cloud serves one on loopback).
"""

from __future__ import annotations

import requests

__all__ = ["DEFAULT_METADATA_URL", "MetadataError", "public_address"]

DEFAULT_METADATA_URL = "http://169.254.169.254"
TIMEOUT_S = 2.0     # the service is on the host: it answers in milliseconds or not at all
TOKEN_TTL_S = 60


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
