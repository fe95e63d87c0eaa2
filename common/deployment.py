"""What a deployment must be given, because its processes share it: a value made up per
process (a random secret, an embedded Redis, a SQLite file, 127.0.0.1) silently splits them."""

from __future__ import annotations

from collections.abc import Mapping

from common.errors import ConfigError

__all__ = ["DEPLOYMENT_NEEDS", "MIN_SECRET_CHARS", "check_deployment"]

DEPLOYMENT_NEEDS = {
    "REDIS_URL": "the Redis every webapp, worker and beat shares (redis://HOST:6379/0, or "
                 "sentinel://HOST:26379;sentinel://HOST2:26379;... with REDIS_MASTER)",
    "DATABASE_URL": "the billing database they share "
                    "(postgresql+psycopg://USER:PASSWORD@HOST/DB)",
    "TICKET_SECRET": "the HMAC secret that signs tickets and node keys, the same in every "
                     "process (make one: python3 -c 'import secrets; "
                     "print(secrets.token_hex(32))')",
    "USER_TOKEN_SECRET": "the secret that signs the page's uid cookies and user tokens, "
                         "the same in every process (make one like TICKET_SECRET)",
    "VOICE_PUBLIC_URL": "the URL nodes join and heartbeat at (https://voice.example.com)",
}
MIN_SECRET_CHARS = 32


def check_deployment(env: Mapping[str, str]) -> None:
    missing = [k for k in DEPLOYMENT_NEEDS if not env.get(k)]
    if missing:
        raise ConfigError("a deployment cannot start without " + "; ".join(
            f"{k}: {DEPLOYMENT_NEEDS[k]}" for k in missing) + ". Set "
            f"{' and '.join(missing)} in the environment (`voicectl run` makes local ones)")
    for key in ("TICKET_SECRET", "USER_TOKEN_SECRET", "VOICE_ADMIN_TOKEN"):
        if 0 < len(env.get(key, "")) < MIN_SECRET_CHARS:
            raise ConfigError(f"{key} is {len(env[key])} characters; a deployment needs at "
                              f"least {MIN_SECRET_CHARS} random ones")
