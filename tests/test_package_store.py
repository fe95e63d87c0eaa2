"""provisioner.packages against a real directory and a real S3 API: moto's HTTP server in
this process on a free port, reached over HTTP by boto3 exactly as a real bucket would be."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from common.errors import PackageError
from common.package import pack, sha256, unpack
from provisioner.packages import FileStore, PackageStore, S3Store, open_store

KEY = "test"          # fake credentials: moto takes any


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 for this module, stopped at its end."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint: str) -> PackageStore:
    bucket = f"b-{uuid.uuid4().hex[:12]}"      # one server for the module: tests keep apart
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id=KEY, aws_secret_access_key=KEY).create_bucket(Bucket=bucket)
    return open_store(f"s3://{bucket}/pfx?endpoint_url={s3_endpoint}&region=us-east-1",
                      KEY, KEY)


@pytest.fixture
def file_store(tmp_path: Path) -> PackageStore:
    return open_store(f"file://{tmp_path}/store")


@pytest.fixture
def package(tmp_path: Path) -> tuple[bytes, str]:
    src = tmp_path / "echo"
    src.mkdir()
    (src / "model.toml").write_text('name = "echo"\nentry = "echo:make"\n')
    (src / "echo.py").write_text("def make(sample_rate, params, files):\n"
                                 "    return lambda pcm: pcm\n")
    _, data, digest = pack(src)
    return data, digest


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest) -> PackageStore:
    """Each behaviour both stores share, run against both (ids: [file], [s3])."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


def test_round_trip(store: PackageStore, package: tuple[bytes, str], tmp_path: Path) -> None:
    data, digest = package
    assert not store.has(digest)
    store.put(digest, data)
    assert store.has(digest)
    got = store.get(digest)
    assert got == data
    assert unpack(got, digest, tmp_path / "out").name == "echo"


def test_put_is_idempotent(store: PackageStore, package: tuple[bytes, str]) -> None:
    data, digest = package
    store.put(digest, data)
    store.put(digest, data)
    assert store.get(digest) == data


def test_missing_package_names_the_push(store: PackageStore) -> None:
    digest = sha256(b"never pushed")
    with pytest.raises(PackageError, match=f"no package {digest} in .*voicectl models push DIR"):
        store.get(digest)


def test_wrong_digest_is_refused_and_nothing_stored(store: PackageStore,
                                                    package: tuple[bytes, str]) -> None:
    data, digest = package
    other = sha256(b"something else")
    with pytest.raises(PackageError, match=f"mismatch: named {other}, content is {digest}"):
        store.put(other, data)
    assert not store.has(other) and not store.has(digest)


@pytest.mark.parametrize("bad", ["../x", "../" + "a" * 61, "A" * 64, "a" * 63,
                                 "a" * 64 + "\n", "a" * 64 + "/../b", ""],
                         ids=["dotdot", "dotdot-64", "upper", "short", "newline", "suffix",
                              "empty"])
def test_malformed_digest_is_refused(store: PackageStore, bad: str) -> None:
    with pytest.raises(PackageError, match="not 64 lowercase hex"):
        store.put(bad, b"x")
    with pytest.raises(PackageError, match="not 64 lowercase hex"):
        store.get(bad)
    with pytest.raises(PackageError, match="not 64 lowercase hex"):
        store.has(bad)


def test_file_store_modes_and_layout(tmp_path: Path, package: tuple[bytes, str]) -> None:
    data, digest = package
    root = tmp_path / "deep" / "store"
    store = open_store(str(root))               # a plain path works as well as file://
    assert isinstance(store, FileStore)
    store.put(digest, data)
    path = root / f"{digest}.tar.gz"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert [p.name for p in root.iterdir()] == [path.name]   # no temp file left
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    store.put(digest, data)
    assert path.stat().st_ino == inode                        # a second put rewrites nothing


def test_file_url_with_a_space(tmp_path: Path, package: tuple[bytes, str]) -> None:
    data, digest = package
    store = open_store(f"file://{tmp_path}/my%20packages")
    store.put(digest, data)
    assert (tmp_path / "my packages" / f"{digest}.tar.gz").read_bytes() == data
    assert store.url == f"file://{tmp_path}/my%20packages"


def test_s3_key_layout(s3_endpoint: str, package: tuple[bytes, str]) -> None:
    data, digest = package
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=KEY, aws_secret_access_key=KEY)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for url, key in ((f"s3://{bucket}/a/b/", f"a/b/{digest}.tar.gz"),
                     (f"s3://{bucket}", f"{digest}.tar.gz")):
        store = open_store(f"{url}?endpoint_url={s3_endpoint}&region=us-east-1", KEY, KEY)
        assert isinstance(store, S3Store)
        store.put(digest, data)
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        client.delete_object(Bucket=bucket, Key=key)


def test_s3_missing_bucket_says_create_it(s3_endpoint: str,
                                          package: tuple[bytes, str]) -> None:
    data, digest = package
    store = open_store(f"s3://no-such-bucket/p?endpoint_url={s3_endpoint}&region=us-east-1",
                       KEY, KEY)
    for call in (lambda: store.put(digest, data), lambda: store.get(digest),
                 lambda: store.has(digest)):
        with pytest.raises(PackageError, match="bucket 'no-such-bucket' does not exist.*create"):
            call()


def test_s3_unreachable_endpoint_is_a_package_error(package: tuple[bytes, str]) -> None:
    from voicectl.procs import free_port

    store = open_store(f"s3://b?endpoint_url=http://127.0.0.1:{free_port()}", KEY, KEY)
    with pytest.raises(PackageError, match="check endpoint_url"):
        store.has(package[1])


@pytest.mark.parametrize("url", ["http://example.com/pkgs", "gs://bucket/p", "s3://",
                                 "s3://b/p?endpoint=http://x", "file://relative/dir", ""],
                         ids=["http", "gs", "no-bucket", "unknown-query", "relative", "empty"])
def test_unknown_url_is_refused_naming_both_forms(url: str) -> None:
    with pytest.raises(PackageError) as e:
        open_store(url)
    assert repr(url) in str(e.value)
    assert "file:///abs/dir" in str(e.value) and "s3://bucket/prefix" in str(e.value)
