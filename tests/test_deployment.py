"""The deployment as docker-compose.yml describes it: every service runs a real entry point
of the installed project, deployed processes refuse to start without the values they share,
Flower and the operator's usage view need credentials, and the package carries what the
image needs. Real processes (gunicorn, celery, Flower, docker-compose); no Docker engine."""

from __future__ import annotations

import base64
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SECRET, USER_SECRET, wait_for

from billing.ledger import Ledger
from voicectl import procs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
OURS = {name: svc for name, svc in COMPOSE["services"].items() if "build" in svc}
# What an operator puts in .env (see .env.example).
DOTENV = {"POSTGRES_PASSWORD": "pw", "TICKET_SECRET": SECRET, "FLOWER_BASIC_AUTH": "ops:s3cret",
          "USER_TOKEN_SECRET": USER_SECRET, "VOICE_PUBLIC_URL": "http://127.0.0.1:8000",
          "TLS_CERT_DIR": "/tmp", "GRAFANA_ADMIN_PASSWORD": "ci"}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, value)


def service_env(svc: dict[str, Any], redis_url: str, db_url: str) -> dict[str, str]:
    """The service's environment as compose gives it, with compose's hosts (redis,
    postgres) and the mounted config file replaced by this machine's."""
    env = {k: interpolate(str(v), DOTENV) for k, v in svc.get("environment", {}).items()}
    mounts = dict(reversed(interpolate(v, DOTENV).split(":")[:2]) for v in svc.get("volumes", []))
    if "VOICE_CONFIG" in env:
        host_path = ROOT / mounts[env["VOICE_CONFIG"]]
        assert host_path.is_file(), f"{env['VOICE_CONFIG']} is mounted from {host_path}"
        env["VOICE_CONFIG"] = str(host_path)
    for key in ("REDIS_URL", "CELERY_BROKER_URL"):
        if key in env:
            env[key] = redis_url
    if "DATABASE_URL" in env:
        env["DATABASE_URL"] = db_url
    return {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"),
            **env}


def test_compose_has_the_services_the_contract_names() -> None:
    assert set(COMPOSE["services"]) >= {"redis", "postgres", "web", "worker", "beat", "flower",
                                        "billing", "redis-replica", "sentinel-1", "sentinel-2",
                                        "sentinel-3"}
    env = COMPOSE["services"]["web"]["environment"]   # every process goes through the sentinels
    assert env["REDIS_URL"].count("sentinel://") == 3 and env["REDIS_MASTER"] == "voice"
    assert "gunicorn" in COMPOSE["services"]["web"]["command"]


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_service_runs_an_entry_point_of_the_project(name: str, redis_url: str,
                                                          tmp_path: Path) -> None:
    """The command's executable is a console script the project's own dependencies install
    (the image installs no dev extras), and run as compose runs it, with a flag that loads
    the app without serving (gunicorn --check-config, --help), it loads."""
    cmd = list(OURS[name]["command"])
    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert cmd[0] in scripts and (BIN / cmd[0]).is_file(), f"{name}: {cmd[0]} not installed"
    dist = scripts[cmd[0]].dist
    assert dist is not None
    needed = {re.split(r"[\[<>=;! ]", r)[0].lower()
              for r in importlib.metadata.requires("voicechanger") or [] if "extra ==" not in r}
    assert dist.name.lower() in needed | {"voicechanger"}, f"{dist.name} is not a dependency"
    db_url = f"sqlite:///{tmp_path / 'billing.sqlite'}"
    Ledger.open(db_url).engine.dispose()             # what the migrate service did first
    dry = ["--check-config", *cmd[1:]] if cmd[0] == "gunicorn" else [*cmd[1:], "--help"]
    out = subprocess.run([cmd[0], *dry], env=service_env(OURS[name], redis_url, db_url),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def docker_compose(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose: apt-get install docker-compose (.ci/run does)")
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                           "-q"], env={"PATH": os.environ["PATH"], **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_compose_validates_and_names_each_missing_secret() -> None:
    ok = docker_compose(DOTENV)
    assert ok.returncode == 0, ok.stderr
    for key in ("TICKET_SECRET", "USER_TOKEN_SECRET", "FLOWER_BASIC_AUTH", "POSTGRES_PASSWORD",
                "VOICE_PUBLIC_URL"):
        bad = docker_compose({k: v for k, v in DOTENV.items() if k != key})
        assert bad.returncode != 0 and f"set {key}" in bad.stderr, (key, bad.stderr)


def start(cmd: list[str], env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env={"PATH": os.environ["PATH"], "HOME": str(tmp), **env},
                          cwd=tmp, capture_output=True, text=True, timeout=120)


GUNICORN = [str(BIN / "gunicorn"), "-k", "gevent", "webapp.wsgi:deployed()"]
CELERY = [str(BIN / "celery"), "-A", "provisioner.worker", "worker", "--pool", "threads"]


@pytest.mark.parametrize("cmd, missing, needle", [
    (GUNICORN, "TICKET_SECRET", "secrets.token_hex"),
    (GUNICORN, "REDIS_URL", "the Redis every webapp"),     # no embedded Redis when deployed
    (GUNICORN, "DATABASE_URL", "the billing database"),
    (GUNICORN, "USER_TOKEN_SECRET", "signs the page's uid cookies and user tokens"),
    (CELERY, "TICKET_SECRET", "the same in every process"),
])
def test_deployed_processes_refuse_to_start_without_what_they_share(
        cmd: list[str], missing: str, needle: str, redis_url: str, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'b.sqlite'}",
           "TICKET_SECRET": SECRET, "USER_TOKEN_SECRET": USER_SECRET,
           "VOICE_PUBLIC_URL": "http://127.0.0.1:8000"}
    del env[missing]
    gunicorn_bind = ["--bind", f"127.0.0.1:{procs.free_port()}"] if "gunicorn" in cmd[0] else []
    out = start(cmd + gunicorn_bind, env, tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and f"without {missing}" in text and needle in text, text[-2000:]


def test_webapp_refuses_a_database_voicectl_migrate_has_not_prepared(redis_url: str,
                                                                      tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'b.sqlite'}",
           "TICKET_SECRET": SECRET, "USER_TOKEN_SECRET": USER_SECRET,
           "VOICE_PUBLIC_URL": "http://127.0.0.1:8000"}
    out = start(GUNICORN + ["--bind", f"127.0.0.1:{procs.free_port()}"], env, tmp_path)
    assert out.returncode != 0 and "run `voicectl migrate`" in out.stdout + out.stderr


def test_the_webapp_loads_no_task_code_and_no_cloud_driver(redis_url: str,
                                                          tmp_path: Path) -> None:
    """The webapp places users and sends the scaler its kick by name; creating machines is
    the worker's. Its process (as gunicorn loads it) holds no libcloud and no task code."""
    db = f"sqlite:///{tmp_path / 'b.sqlite'}"
    Ledger.open(db).engine.dispose()                    # migrated, as `voicectl migrate` does
    env = {"PATH": os.environ["PATH"], "REDIS_URL": redis_url, "DATABASE_URL": db,
           "TICKET_SECRET": SECRET, "USER_TOKEN_SECRET": USER_SECRET,
           "VOICE_PUBLIC_URL": "http://127.0.0.1:8000"}
    probe = ("import sys, webapp.wsgi; webapp.wsgi.deployed(); print(sorted(m for m in "
             "sys.modules if m.split('.')[0] "
             "== 'libcloud' or m in ('provisioner.tasks', 'provisioner.fleet', "
             "'provisioner.clouds')))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_short_secrets_are_refused(tmp_path: Path) -> None:
    out = start(CELERY, {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "sqlite://",
                         "TICKET_SECRET": "changeme", "USER_TOKEN_SECRET": USER_SECRET,
                         "VOICE_PUBLIC_URL": "http://x"}, tmp_path)
    assert out.returncode != 0 and "TICKET_SECRET is 8 characters" in out.stdout + out.stderr


def test_flower_as_compose_runs_it_needs_its_credentials(redis_url: str, tmp_path: Path) -> None:
    svc = COMPOSE["services"]["flower"]
    port = procs.free_port()
    cmd = [f"--port={port}" if a.startswith("--port") else a for a in svc["command"]]
    cmd = [a.replace("0.0.0.0", "127.0.0.1") for a in cmd]
    proc = procs.spawn(cmd, env=service_env(svc, redis_url, f"sqlite:///{tmp_path / 'b.sqlite'}"),
                       log=tmp_path / "flower.log")
    try:
        def status(auth: str | None, path: str = "/api/workers") -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if auth:
                req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return e.code
            except OSError:
                return 0                             # not listening yet

        assert wait_for(lambda: status(None), 30, "Flower did not start") == 401
        assert status("ops:wrong") == 401 and status(None, "/") == 401
        assert status(DOTENV["FLOWER_BASIC_AUTH"]) == 200
    finally:
        procs.stop([proc])


def test_the_package_carries_migrations_scripts_and_configs(tmp_path: Path) -> None:
    """The image installs the project from a wheel, not this checkout: what the processes
    read from their package folders must be in it."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("voicechanger-*.whl"))).namelist())
    for path in ("billing/migrations/env.py", "billing/migrations/versions/0001_initial.py",
                 "common/deploy.toml", "common/default.toml", "webapp/wsgi.py",
                 "webapp/static/index.html", "models/miku/model.toml", "models/robot/robot.py"):
        assert path in names, path
    assert any(n.startswith("provisioner/state/scripts/") and n.endswith(".lua") for n in names)
