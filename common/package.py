"""Model packages (docs/models.md): read `model.toml`, pack a directory content-addressed.

This module never imports a model's code (the node does: worker_node/package.py). The same
directory always packs to the same bytes (sorted entries, no times or owners), so its sha256
digest names it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import PackageError

MANIFEST = "model.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")   # model, region, user and session names
MAX_PACKAGE_BYTES = 2 * 1024**3       # weights of a real model fit; a runaway directory not
ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*:[A-Za-z_][A-Za-z0-9_]*$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
SKIP = ("__pycache__", ".pyc", ".git")


@dataclass(frozen=True)
class Manifest:
    """What model.toml says: the control plane reads it as data, never runs it."""

    name: str
    entry: str                          # "module:factory"
    streams_per_gpu: int = 4
    description: str = ""
    batch: str = ""                     # "module:function", or "" (per-stream calls only)
    params: Mapping[str, Any] = field(default_factory=dict)


def read_manifest(text: str, where: str = MANIFEST) -> Manifest:
    """Parse model.toml, or PackageError naming the bad field and the fix."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PackageError(f"{where} is not valid TOML: {e}") from None
    name, entry = doc.get("name"), doc.get("entry")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PackageError(f"{where}: name = {name!r} must be 1-64 of [A-Za-z0-9_.-], "
                           'such as name = "robot"')
    for key, value in (("entry", entry), ("batch", doc.get("batch"))):
        if (key == "entry" or value is not None) and not (
                isinstance(value, str) and ENTRY_RE.match(value)):
            raise PackageError(f"{where}: {key} = {value!r} must be \"module:function\", such "
                               f"as {key} = \"{name.replace('-', '_')}:make\" for "
                               f"{name.replace('-', '_')}.py's function")
    streams = doc.get("streams_per_gpu", 4)
    if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= 64:
        raise PackageError(f"{where}: streams_per_gpu = {streams!r} must be a whole number "
                           "1-64 (how many streams one GPU serves at once)")
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise PackageError(f"{where}: params must be a table ([params])")
    unknown = set(doc) - {"name", "entry", "streams_per_gpu", "description", "batch", "params"}
    if unknown:
        raise PackageError(f"{where}: unknown keys {sorted(unknown)}; put model settings "
                           "under [params]")
    return Manifest(name, str(entry), streams, str(doc.get("description", "")),
                    str(doc.get("batch", "")), params)


def load_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise PackageError(f"{directory} has no {MANIFEST}; a model package is a directory "
                           "with model.toml (name, entry) beside its code (docs/models.md)")
    return read_manifest(path.read_text(encoding="utf-8"), str(path))


def _files(directory: Path) -> list[Path]:
    return sorted((p for p in directory.rglob("*") if p.is_file()
                   and not any(part in SKIP or part.endswith(".pyc") for part in p.parts)),
                  key=lambda p: p.relative_to(directory).as_posix())


def pack(directory: Path) -> tuple[Manifest, bytes, str]:
    """The manifest, the archive (a deterministic tar.gz) and its sha256 digest."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    buf = io.BytesIO()
    # mtime 0 in the gzip header too: the same files, the same bytes, the same digest
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _files(directory):
            info = tarfile.TarInfo(path.relative_to(directory).as_posix())
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError(f"{directory} packs to {len(data)} bytes; at most "
                           f"{MAX_PACKAGE_BYTES} (keep caches and data sets out of it)")
    return manifest, data, sha256(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unpack(data: bytes, digest: str, dest: Path) -> Manifest:
    """Check the archive against its digest and unpack it into `dest` (made anew); refuse
    a mismatch or a path that leaves `dest`."""
    if sha256(data) != digest:
        raise PackageError(f"package digest mismatch: expected {digest}, got {sha256(data)}; "
                           "the package was changed or truncated on the way: refusing it")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")   # no absolute paths, no .., no links out
    return load_manifest(dest)
