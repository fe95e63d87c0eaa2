"""User identity (CONTRACT "User identity (v2)"): the page's signed uid cookie, user tokens
from `voicectl user-token`, `?user=` only for dev users, /api/usage for the caller, take-over
by the same user only; and anonymous users' demand, which boots nothing where the config
says so. Pure table tests first, then a real webapp, real Redis and real node processes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, Webapp, closed_code, lobby, serve, start_stream
from simple_websocket import Client, ConnectionClosed
from test_node import stream_tone

from billing.ledger import Ledger
from common.config import DEFAULT_CONFIG_PATH, Config, load_config
from common.errors import ConfigError, IdentityError
from common.identity import (
    Identity,
    Via,
    identify,
    mint_token,
    read_cookie,
    read_token,
    sign_cookie,
)
from provisioner import fleet as fleet_adapter
from provisioner.policy import decide
from provisioner.state import State
from research.quality import harmonic_tone
from voicectl import procs
from voicectl.util import local_user_secret
from webapp.app import create_app

ADMIN = "op-" + "x" * 40
HOW = "voicectl user-token"   # every refusal says how to authenticate


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def edited(token: str, payload: dict[str, Any]) -> str:
    """`token` with its payload replaced and its signature kept."""
    return f"{_b64(json.dumps(payload).encode())}.{token.rsplit('.', 1)[1]}"


# --- pure: the cookie, the token, identify ------------------------------------------

def test_a_cookie_is_refused_unless_this_server_signed_that_id() -> None:
    cookie = sign_cookie("u-1f", "k")
    assert cookie.startswith("u-1f.") and read_cookie(cookie, "k") == "u-1f"
    sig = cookie.rsplit(".", 1)[1]
    for bad in (f"alice.{sig}", "u-1f", sign_cookie("u-1f", "other-secret"),
                mint_token("u-1f", "k", now=0.0, ttl_s=1e9)):    # a token is not a cookie
        with pytest.raises(IdentityError, match="reload the page.*" + HOW):
            read_cookie(bad, "k")


def test_a_token_is_refused_when_edited_expired_or_foreign() -> None:
    token = mint_token("alice", "k", now=100.0, ttl_s=60)
    assert read_token(token, "k", now=159.0) == "alice"
    for bad, now, needle in [
        (edited(token, {"user": "mallory", "exp": 160.0}), 100.0, "edited"),
        (edited(token, {"user": "alice", "exp": 1e12}), 100.0, "edited"),
        (mint_token("alice", "other-secret", now=100.0, ttl_s=60), 100.0, "edited"),
        (sign_cookie("alice", "k"), 100.0, "edited"),                # a cookie is not a token
        (token, 161.0, "expired 1 s ago"),
    ]:
        with pytest.raises(IdentityError, match=f"{needle}.*{HOW}"):
            read_token(bad, "k", now=now)
    with pytest.raises(IdentityError, match="1-64 characters"):
        mint_token("bad id!", "k", now=0.0, ttl_s=60)


CFG = load_config({}).with_overrides(user_token_secret="k", dev_users=False)
DEV = CFG.with_overrides(dev_users=True)
TOKEN = mint_token("alice", "k", now=0.0, ttl_s=60)
COOKIE = sign_cookie("u-9", "k")


@pytest.mark.parametrize("cfg, token, cookie, named, want", [
    (CFG, None, COOKIE, None, Identity("u-9", Via.COOKIE)),
    (CFG, TOKEN, COOKIE, None, Identity("alice", Via.TOKEN)),         # a token wins
    (CFG, None, COOKIE, "alice", "?user=alice is not accepted here"),  # not with a cookie
    (CFG, TOKEN, None, "alice", "?user=alice is not accepted here"),
    (CFG, None, None, None, "no user id"),
    (DEV, None, COOKIE, "bob", Identity("bob", Via.DEV)),
    (DEV, TOKEN, None, "bob", "not both"),
    (DEV, None, None, "bad id!", "1-64 characters"),
])
def test_identify(cfg: Config, token: str | None, cookie: str | None, named: str | None,
                  want: Identity | str) -> None:
    if isinstance(want, Identity):
        assert identify(token=token, cookie=cookie, named=named, cfg=cfg, now=1.0) == want
    else:
        with pytest.raises(IdentityError, match=re.escape(want)):
            identify(token=token, cookie=cookie, named=named, cfg=cfg, now=1.0)


def test_only_authenticated_demand_scales_where_the_config_says_so(tmp_path: Path) -> None:
    page, login = Identity("u-9", Via.COOKIE), Identity("alice", Via.TOKEN)
    local = load_config({})
    deployed = load_config({"VOICE_CONFIG": str(DEFAULT_CONFIG_PATH.with_name("deploy.toml"))})
    assert (local.anonymous_demand_scales, deployed.anonymous_demand_scales) == (True, False)
    assert page.scales(local) and not page.scales(deployed) and login.scales(deployed)
    assert not page.authenticated and Identity("bob", Via.DEV).authenticated
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_CONFIG_PATH.read_text().replace(
        "anonymous_demand_scales = true", 'anonymous_demand_scales = "no"'))
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config({"VOICE_CONFIG": str(bad)})


def test_the_local_user_secret_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "var" / "user-token-secret"
    first = local_user_secret(path)
    assert len(first) == 64 and local_user_secret(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- a webapp as deployed: no dev users, an operator, anonymous demand not scaling -----

@pytest.fixture
def site(cfg: Config, state: State) -> Iterator[Webapp]:
    c = cfg.with_overrides(dev_users=False, admin_token=ADMIN, anonymous_demand_scales=False)
    host, server = serve(create_app(c, state, ledger=Ledger.open(c.database_url)))
    yield Webapp(f"http://{host}", f"ws://{host}", c, state)
    server.shutdown()


@pytest.fixture
def nodes(site: Webapp, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(site.config, site.state, tmp_path, site.base_url)
    yield f
    procs.stop(f.procs)


def http(url: str, cookie: str | None = None, auth: str | None = None
         ) -> tuple[int, Any, Any]:
    """(status, the JSON body or None, the headers)."""
    req = urllib.request.Request(url)
    if cookie:
        req.add_header("Cookie", f"uid={cookie}")
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
            is_json = r.headers.get_content_type() == "application/json"
            return r.status, json.loads(body) if is_json else None, r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def as_cookie(user: str, site: Webapp) -> dict[str, str]:
    return {"Cookie": f"uid={sign_cookie(user, site.config.user_token_secret)}"}


def token_for(user: str, site: Webapp, ttl_s: float = 60.0, now: float | None = None) -> str:
    return mint_token(user, site.config.user_token_secret, ttl_s=ttl_s,
                      now=time.time() if now is None else now)


def test_the_page_sets_a_signed_cookie_once_and_replaces_a_forged_one(site: Webapp) -> None:
    _, _, headers = http(site.base_url + "/")
    set_cookie = headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    value = set_cookie.split(";")[0].split("=", 1)[1]
    user = read_cookie(value, site.config.user_token_secret)
    assert user.startswith("u-")
    assert http(site.base_url + "/", cookie=value)[2]["Set-Cookie"] is None     # reused
    assert http(site.base_url + "/api/me", cookie=value)[1] == {
        "user": user, "via": "cookie", "authenticated": False}
    forged = f"alice.{value.rsplit('.', 1)[1]}"
    code, body, _ = http(site.base_url + "/api/me", cookie=forged)
    assert code == 400 and "reload the page" in body["message"] and HOW in body["message"]
    fresh = http(site.base_url + "/", cookie=forged)[2]["Set-Cookie"]
    assert read_cookie(fresh.split(";")[0].split("=", 1)[1],
                       site.config.user_token_secret) not in ("alice", user)


def test_the_lobby_refuses_whom_it_cannot_trust_saying_how_to_authenticate(
        site: Webapp) -> None:
    token = token_for("alice", site)
    forged_cookie = {"Cookie": f"uid=alice.{sign_cookie('u-eve', 'x').rsplit('.', 1)[1]}"}
    for query, headers, needle in [
        ("user=alice", None, "?user=alice is not accepted here"),
        ("user=alice", as_cookie("u-1", site), "?user=alice is not accepted here"),
        (f"token={edited(token, {'user': 'mallory', 'exp': time.time() + 60})}", None,
         "edited"),
        (f"token={token_for('alice', site, now=time.time() - 120)}", None, "expired"),
        ("", forged_cookie, "reload the page"),
        ("", None, "no user id"),
    ]:
        msg = lobby(site.ws_url, f"{query}&model=miku&region=us-west", headers=headers)[-1]
        assert msg["type"] == "error" and msg["code"] == "bad_request", (query, msg)
        assert needle in msg["message"] and HOW in msg["message"], (query, msg)


def test_voicectl_user_token_is_accepted_by_the_lobby(site: Webapp, nodes: Fleet) -> None:
    node = nodes.start("miku")
    env = {**os.environ, "USER_TOKEN_SECRET": site.config.user_token_secret}

    def voicectl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "voicectl", "user-token", *args],
                              env=env, capture_output=True, text=True, timeout=120)

    out = voicectl("alice", "--ttl", "60", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["user"] == "alice" and got["expires_at"] == pytest.approx(time.time() + 60, abs=30)
    ready = lobby(site.ws_url, f"token={got['token']}&model=miku&region=us-west")[-1]
    assert ready["type"] == "ready" and ready["node_id"] == node, ready
    assert site.state.lock_holder("alice") == ready["session_id"]
    assert http(f"{site.base_url}/api/me?token={got['token']}")[1]["via"] == "token"
    plain = voicectl("bob")
    assert plain.returncode == 0 and read_token(plain.stdout.split()[0],
                                                site.config.user_token_secret,
                                                now=time.time()) == "bob"
    bad = voicectl("bad id!")
    assert bad.returncode == 2 and "1-64 characters" in bad.stderr


def test_usage_answers_for_the_caller_and_others_only_to_operators(site: Webapp) -> None:
    url, me = site.base_url + "/api/usage", sign_cookie("u-me", site.config.user_token_secret)
    token = token_for("tok", site)
    assert http(url, cookie=me)[:2] == (200, {"user": "u-me", "seconds": 0, "minutes": []})
    assert http(url + "?user=u-me", cookie=me)[1]["user"] == "u-me"
    assert http(f"{url}?token={token}")[1]["user"] == "tok"
    for query, cookie in [("?user=bob", me), (f"?user=bob&token={token}", None),
                          ("?user=u-me", "u-me")]:        # an unsigned cookie is nobody
        code, body, _ = http(url + query, cookie=cookie)
        assert code == 403 and body["error"] == "forbidden", (query, body)
        assert "VOICE_ADMIN_TOKEN" in body["message"] and HOW in body["message"]
    assert http(url + "?user=bob", auth="Bearer wrong")[0] == 403
    assert http(url + "?user=bob", auth=f"Bearer {ADMIN}")[:2] == (
        200, {"user": "bob", "seconds": 0, "minutes": []})
    code, body, _ = http(url, cookie="u-me")
    assert code == 400 and "reload the page" in body["message"]


def test_take_over_only_by_the_same_user(site: Webapp, nodes: Fleet) -> None:
    nodes.start("miku")
    q = "model=miku&region=us-west"
    first = lobby(site.ws_url, f"token={token_for('alice', site)}&{q}")[-1]
    old = start_stream(first)
    tone = harmonic_tone(150.0, 16000, 0.06)
    # Nobody else can take alice's stream: another user's take-over is their own stream,
    # and naming alice, or forging her cookie, is refused.
    eve = lobby(site.ws_url, f"token={token_for('eve', site)}&{q}&takeover=1")[-1]
    assert eve["type"] == "ready"
    forged = {"Cookie": f"uid=alice.{sign_cookie('u-eve', 'x').rsplit('.', 1)[1]}"}
    for query, headers in [(f"user=alice&{q}&takeover=1", None), (f"{q}&takeover=1", forged),
                           (f"{q}&takeover=1", as_cookie("u-eve", site))]:
        msg = lobby(site.ws_url, query, headers=headers)[-1]
        assert msg["type"] in ("error", "ready") and msg.get("session_id") != first["session_id"]
    assert site.state.lock_holder("alice") == first["session_id"]
    assert len(stream_tone(old, tone)) == len(tone)          # still streaming
    # alice, with a new token from her login: refused without take-over, takes it with it
    again = lobby(site.ws_url, f"token={token_for('alice', site)}&{q}")[-1]
    assert again["code"] == "already_streaming"
    second = lobby(site.ws_url, f"token={token_for('alice', site)}&{q}&takeover=1")[-1]
    assert second["type"] == "ready" and site.state.lock_holder("alice") == second["session_id"]
    assert closed_code(old)[0] == 4409


def test_anonymous_users_wait_for_free_slots_and_boot_nothing(site: Webapp,
                                                              nodes: Fleet) -> None:
    pool = "teto|1|us-west"
    anon = Client.connect(f"{site.ws_url}/ws/session?model=teto&region=us-west",
                          headers=as_cookie("u-anon", site))
    queued = json.loads(anon.receive(timeout=5))
    assert queued["type"] == "queued" and "eta_s" not in queued            # nothing boots
    assert "no capacity is booted for anonymous users" in queued["note"]
    login = Client.connect(f"{site.ws_url}/ws/session?model=teto&region=us-west"
                           f"&token={token_for('bob', site)}")
    theirs = json.loads(login.receive(timeout=5))
    assert theirs["type"] == "queued" and theirs["eta_s"] > 0 and "note" not in theirs
    assert site.state.waiting()[pool] == (2, 1)        # both wait; bob's wait is demand

    def boots(now: float) -> list[str]:
        """What the scaler boots for the users waiting (no warm buffer: bob's one arrival
        would book one at a high enough z)."""
        snap, _ = fleet_adapter.snapshot(site.state, site.config, now)
        scaling = replace(fleet_adapter.scaling_config(site.config), buffer_z=-10.0)
        decisions = decide(snap, now, scaling)
        return [k.region for k in decisions.boot if k.model == "teto"]

    rate = site.state.arrivals([pool])[pool].rate * site.config.arrival_tau_s
    assert rate == pytest.approx(1.0, rel=0.01)        # bob's arrival counts, not anon's
    assert boots(time.time()) == ["us-west"]
    login.close()
    deadline = time.monotonic() + 5
    while site.state.waiting()[pool] != (1, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.state.waiting()[pool] == (1, 0)
    assert boots(time.time()) == []                    # anon waits; nothing boots for it
    node = nodes.start("teto")                         # a slot frees up: anon takes it
    while (msg := json.loads(anon.receive(timeout=10)))["type"] != "ready":
        assert msg["type"] in ("queued", "booting"), msg
    assert msg["node_id"] == node
    with contextlib.suppress(ConnectionClosed):   # the lobby closes itself after `ready`
        anon.close()
