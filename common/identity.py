"""Who a request is: the one identity function, and the cookie and tokens it trusts.

The three ways a request names its user are `Via`'s (docs/protocol.md, "User identity").
The cookie and the user token are both signed with `USER_TOKEN_SECRET` through itsdangerous
(HMAC-SHA1 over a derived key), each with its own salt, so a cookie is never accepted as a
token or the other way round. Pure code: the clock and the random id are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from itsdangerous import BadData, Signer, URLSafeSerializer

from common.config import NAME_RE, Config
from common.errors import IdentityError

__all__ = ["COOKIE", "HOW_TO", "Identity", "Via", "identify", "mint_token", "read_cookie",
           "read_token", "sign_cookie"]

COOKIE = "uid"
_COOKIE_SALT = "uid-cookie"
_TOKEN_SALT = "user-token"
HOW_TO = ("authenticate with the uid cookie the page sets (open the page and reload it) or "
          "with ?token=T, a user token from your login system or from "
          "`voicectl user-token USER` (signed with USER_TOKEN_SECRET)")
_NEW_TOKEN = "get a new one (from your login system or `voicectl user-token USER`)"


class Via(StrEnum):
    """How the request named its user."""

    COOKIE = "cookie"   # the page's signed cookie: a browser, anonymous
    TOKEN = "token"     # a user token: someone holding USER_TOKEN_SECRET vouches for it
    DEV = "dev"         # ?user= with VOICE_DEV_USERS=1: taken at its word


@dataclass(frozen=True)
class Identity:
    user: str
    via: Via

    @property
    def authenticated(self) -> bool:
        """Vouched for by a token, or named in development (where anyone is anyone)."""
        return self.via is not Via.COOKIE

    def scales(self, cfg: Config) -> bool:
        """This user's waiting counts as demand the autoscaler boots nodes for (an anonymous
        one's only with `anonymous_demand_scales`)."""
        return self.authenticated or cfg.anonymous_demand_scales


def _valid(user: object, what: str) -> str:
    if not isinstance(user, str) or not NAME_RE.match(user):
        raise IdentityError(f"{what} names user {str(user)[:80]!r}, which is invalid: use "
                            "1-64 characters of A-Z a-z 0-9 _ . -")
    return user


def sign_cookie(user: str, secret: str) -> str:
    """The `uid` cookie's value for `user`: the id, a dot, its signature."""
    return Signer(secret, salt=_COOKIE_SALT).sign(_valid(user, "the cookie")).decode()


def read_cookie(value: str, secret: str) -> str:
    """The user a `uid` cookie names, if this server signed it; else IdentityError."""
    try:
        user = Signer(secret, salt=_COOKIE_SALT).unsign(value).decode()
    except BadData:
        raise IdentityError(f"the uid cookie {value[:80]!r} was not signed by this server "
                            "(edited, forged, or signed with an older USER_TOKEN_SECRET): "
                            f"reload the page to get a new one; or {HOW_TO}") from None
    return _valid(user, "the uid cookie")


def mint_token(user: str, secret: str, *, now: float, ttl_s: float) -> str:
    """A user token for `user` that expires `ttl_s` after `now`."""
    if not ttl_s > 0:
        raise IdentityError(f"a user token's ttl must be positive seconds, not {ttl_s!r}")
    payload = {"user": _valid(user, "the token"), "exp": round(now + ttl_s, 3)}
    return URLSafeSerializer(secret, salt=_TOKEN_SALT).dumps(payload)


def read_token(token: str, secret: str, *, now: float) -> str:
    """The user a token vouches for, if genuine and unexpired; else IdentityError."""
    try:
        payload = URLSafeSerializer(secret, salt=_TOKEN_SALT).loads(token)
    except BadData:
        raise IdentityError("the user token is malformed, edited or not signed with this "
                            f"deployment's USER_TOKEN_SECRET: {_NEW_TOKEN}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int | float):
        raise IdentityError(f"the user token carries no expiry: {_NEW_TOKEN}")
    if payload["exp"] < now:
        raise IdentityError(f"the user token expired {now - payload['exp']:.0f} s ago: "
                            f"{_NEW_TOKEN}, longer-lived with --ttl S")
    return _valid(payload.get("user"), "the user token")


def identify(*, token: str | None, cookie: str | None, named: str | None, cfg: Config,
             now: float) -> Identity:
    """Who the request is, from its `?token=`, its `uid` cookie and its `?user=` (`named`).

    A token wins over the cookie; `?user=` is refused without dev users, and beside a token.
    Raises IdentityError saying how to authenticate."""
    if named and not cfg.dev_users:
        raise IdentityError(f"?user={named[:80]} is not accepted here (only with "
                            f"VOICE_DEV_USERS=1, for development): {HOW_TO}")
    if named and token:
        raise IdentityError("pass either ?token= or ?user=, not both")
    if token:
        return Identity(read_token(token, cfg.user_token_secret, now=now), Via.TOKEN)
    if named:
        return Identity(_valid(named, "?user="), Via.DEV)
    if cookie:
        return Identity(read_cookie(cookie, cfg.user_token_secret), Via.COOKIE)
    raise IdentityError(f"no user id: {HOW_TO}" + (", or in development ?user=ID"
                                                 if cfg.dev_users else ""))
