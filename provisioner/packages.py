"""The content-addressed store of model packages: each archive is named by its sha256 digest.

A directory serves one host (dev, tests); an S3-compatible bucket serves a fleet. Both hold
`<digest>.tar.gz` (under `<prefix>/` in a bucket). A digest is checked before it becomes a
path or key, and an archive against its digest before it is stored, so a name never lies.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from common.errors import PackageError
from common.package import DIGEST_RE, sha256


class PackageStore(Protocol):
    url: str

    def put(self, digest: str, data: bytes) -> None: ...
    def get(self, digest: str) -> bytes: ...
    def has(self, digest: str) -> bool: ...


def _name(digest: str, data: bytes | None = None) -> str:
    """`<digest>.tar.gz`, or PackageError: a bad digest never reaches a path or a key."""
    # fullmatch: DIGEST_RE's `$` would let a trailing newline through
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise PackageError(f"package digest {digest!r} is not 64 lowercase hex digits "
                           "(a sha256); use the digest `voicectl models push` printed")
    if data is not None and sha256(data) != digest:
        raise PackageError(f"package digest mismatch: named {digest}, content is "
                           f"{sha256(data)}; refusing to store it (push the package again)")
    return f"{digest}.tar.gz"


def _missing(digest: str, url: str) -> PackageError:
    return PackageError(f"no package {digest} in {url}; push it again with "
                        "voicectl models push DIR")


class FileStore:
    """A directory (mode 0700) of archives (mode 0600), each written whole or not at all."""

    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                root.mkdir(mode=0o700)
                root.chmod(0o700)             # whatever the umask: packages are ours alone
        except OSError as e:
            raise PackageError(f"cannot create the package directory {root}: {e}") from None

    def put(self, digest: str, data: bytes) -> None:
        path = self.root / _name(digest, data)
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".", suffix=".part")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)             # readers see the whole archive or none
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PackageError(f"cannot write package {digest} to {self.root}: {e}") from None

    def get(self, digest: str) -> bytes:
        try:
            return (self.root / _name(digest)).read_bytes()
        except FileNotFoundError:
            raise _missing(digest, self.url) from None
        except OSError as e:
            raise PackageError(f"cannot read package {digest} in {self.root}: {e}") from None

    def has(self, digest: str) -> bool:
        return (self.root / _name(digest)).is_file()


class S3Store:
    """A bucket that must already exist; `<prefix>/<digest>.tar.gz` per package."""

    def __init__(self, url: str, bucket: str, prefix: str, client: Any) -> None:
        self.url, self.bucket, self.prefix, self.client = url, bucket, prefix, client

    def _key(self, digest: str, data: bytes | None = None) -> str:
        name = _name(digest, data)
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextlib.contextmanager
    def _errors(self, digest: str) -> Iterator[None]:
        """botocore's errors as PackageErrors that say what to do."""
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            yield
        except (BotoCoreError, ClientError) as e:
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
            if code == "NoSuchKey":
                raise _missing(digest, self.url) from None
            if code in ("NoSuchBucket", "404"):
                raise PackageError(f"bucket {self.bucket!r} does not exist at {self.url}; "
                                   f"create it first (aws s3 mb s3://{self.bucket}): the "
                                   "store creates nothing") from None
            raise PackageError(f"package {digest} at {self.url}: {e}; check endpoint_url, "
                               "region, and that the access and secret keys may read and "
                               f"write s3://{self.bucket}/{self.prefix}") from None

    def put(self, digest: str, data: bytes) -> None:
        key = self._key(digest, data)
        if not self.has(digest):
            with self._errors(digest):
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, digest: str) -> bytes:
        key = self._key(digest)
        with self._errors(digest):
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def has(self, digest: str) -> bool:
        from botocore.exceptions import ClientError
        key = self._key(digest)
        with self._errors(digest):
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except ClientError as e:
                if e.response["Error"]["Code"] != "404":
                    raise
            self.client.head_bucket(Bucket=self.bucket)   # a HEAD's 404 names neither
            return False


def open_store(url: str, access_key: str = "", secret_key: str = "") -> PackageStore:
    """`file:///abs/dir` or a plain path -> FileStore (creates the directory, mode 0700);
    `s3://bucket/prefix?endpoint_url=http://127.0.0.1:5000&region=us-east-1` -> S3Store
    (credentials from the arguments when given, else boto3's usual chain).
    Anything else: PackageError naming the URL and the two accepted forms."""
    parts = urlsplit(url)
    if url and not parts.scheme:
        return FileStore(url, Path(url).resolve())
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
        return FileStore(url, Path(unquote(parts.path)))
    query = parse_qs(parts.query)
    if parts.scheme != "s3" or not parts.netloc or set(query) - {"endpoint_url", "region"}:
        raise PackageError(f"package store {url!r} is neither file:///abs/dir (or a plain "
                           "path) nor s3://bucket/prefix?endpoint_url=http://host:port&"
                           "region=us-east-1 (endpoint_url and region optional)")
    import boto3  # only for an s3:// store: a local run and its CLI start without it
    from botocore.config import Config

    endpoint = query.get("endpoint_url", [None])[-1]
    # Path-style and checksums only when required: MinIO, Ceph and moto accept that, and
    # every archive is checked against its sha256 digest anyway.
    config = Config(s3={"addressing_style": "path" if endpoint else "auto"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region", [None])[-1],
                          aws_access_key_id=access_key or None,
                          aws_secret_access_key=secret_key or None, config=config)
    return S3Store(url, parts.netloc, parts.path.strip("/"), client)
