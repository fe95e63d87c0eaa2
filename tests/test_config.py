"""The configuration object and tickets: pure table tests, no I/O beyond temp files."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError, TicketError
from common.tickets import LEEWAY_S, Ticket, sign, verify


def test_defaults_and_environment_knobs() -> None:
    cfg = load_config({})
    assert cfg.model_load_s == 10.0 and cfg.crash_rate == 0.0 and cfg.redis_url is None
    assert cfg.database_url.startswith("sqlite:///") and cfg.streams_per_gpu("miku") == 4
    assert {m.name for m in cfg.models} >= {"miku", "teto"}
    assert cfg.provider("local").price_per_hour == Decimal("1.10")
    cfg = load_config({"MODEL_LOAD_SECONDS": "0.5", "CRASH_RATE": "0.1",
                       "REDIS_URL": "redis://x:1/0", "DATABASE_URL": "postgresql://db/x"})
    assert (cfg.model_load_s, cfg.crash_rate, cfg.redis_url, cfg.database_url) == (
        0.5, 0.1, "redis://x:1/0", "postgresql://db/x")


@pytest.mark.parametrize("env, needle", [
    ({"MODEL_LOAD_SECONDS": "ten"}, "MODEL_LOAD_SECONDS='ten' is not a number"),
    ({"CRASH_RATE": "2"}, "out of range"),
    ({"VOICE_CONFIG": "/nonexistent.toml"}, "does not exist"),
])
def test_bad_knobs_name_the_value(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(env)


@pytest.mark.parametrize("text, needle", [
    ("[[regions]]\nname='r'\nprovider='nope'\nlat=0\nlon=0\n[[models]]\npackage='models/miku'\n",
     "provider 'nope'"),
    ("[providers.local]\nprice_per_hour='1'\n[[models]]\npackage='models/miku'\n",
     "at least one"),
    ("not toml [", "not valid TOML"),
    ("[[regions]]\nname='r'\nprovider='local'\nlat=0\nlon=0\n[providers.local]\n"
     "price_per_hour='1'\n[[models]]\nname='m'\nsemitones=4\n", "has no 'package'"),
    ("[[regions]]\nname='r'\nprovider='local'\nlat=0\nlon=0\n[providers.local]\n"
     "price_per_hour='1'\n[[models]]\npackage='models/nope'\n", "has no model.toml"),
    ("[settings]\nbogus=1\n[providers.local]\nprice_per_hour='1'\n[[regions]]\nname='r'\n"
     "provider='local'\nlat=0\nlon=0\n[[models]]\npackage='models/miku'\n", "bogus"),
])
def test_bad_config_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config({"VOICE_CONFIG": str(path)})


def test_ticket_round_trip_and_refusals() -> None:
    t = Ticket("u", "s", "n1", "miku", "1", 3, exp=100.0)
    token = sign(t, "k")
    assert verify(token, "k", node="n1", now=50.0) == t
    assert verify(token, "k", node="n1", now=100.0 + LEEWAY_S - 1) == t   # clocks differ
    for args, needle in [(("k", "n2", 50.0), "for node"), (("x", "n1", 50.0), "forged"),
                         (("k", "n1", 100.0 + LEEWAY_S + 1), "expired")]:
        with pytest.raises(TicketError, match=needle):
            verify(token, args[0], node=args[1], now=args[2])
    with pytest.raises(TicketError, match="malformed"):
        verify("nodot", "k", node="n1", now=0)


DEPLOYED = {"REDIS_URL": "redis://redis:6379/0", "DATABASE_URL": "postgresql://db/voice",
            "TICKET_SECRET": "s" * 64, "USER_TOKEN_SECRET": "u" * 64,
            "VOICE_PUBLIC_URL": "https://voice.example.com"}


@pytest.mark.parametrize("missing", sorted(DEPLOYED))
def test_a_deployment_names_each_missing_shared_value(missing: str) -> None:
    env = {k: v for k, v in DEPLOYED.items() if k != missing}
    load_config(env)                                   # a local run makes up its own
    with pytest.raises(ConfigError, match=f"without {missing}: .*Set {missing} in the env"):
        load_config(env, deployed=True)


def test_a_deployment_takes_its_values_and_refuses_short_secrets() -> None:
    cfg = load_config({**DEPLOYED, "VOICE_ADMIN_TOKEN": "a" * 40}, deployed=True)
    assert (cfg.deployed, cfg.ticket_secret, cfg.admin_token) == (True, "s" * 64, "a" * 40)
    assert not cfg.dev_users and load_config({"VOICE_DEV_USERS": "1"}).dev_users
    assert load_config({}).ticket_secret != load_config({}).ticket_secret   # local: random
    for key in ("TICKET_SECRET", "USER_TOKEN_SECRET", "VOICE_ADMIN_TOKEN"):
        with pytest.raises(ConfigError, match=f"{key} is 5 characters"):
            load_config({**DEPLOYED, key: "short"}, deployed=True)
