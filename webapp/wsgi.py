"""The webapp under gunicorn's gevent worker (docs/architecture.md, "Serving the webapp").

    gunicorn -k gevent --worker-connections 10000 --workers 2 'webapp.wsgi:deployed()'
    gunicorn -k gevent --workers 1 'webapp.wsgi:local()'      (`voicectl run` starts this)

`deployed()` refuses to start without what a deployment shares (REDIS_URL, DATABASE_URL,
TICKET_SECRET, USER_TOKEN_SECRET, VOICE_PUBLIC_URL) or with a billing database that
`voicectl migrate` has not brought to this code's schema. Either builds its app in the
worker, after gevent patched the standard library (never `--preload`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from flask import Flask

from billing.ledger import Ledger
from common.config import Config, load_config
from common.errors import ConfigError, VoiceError
from provisioner.state import State, connect
from webapp.app import before_serving, create_app

log = logging.getLogger("webapp.wsgi")


def deployed() -> Flask:
    return _build(_deployment, migrate=False)


def _deployment() -> Config:
    cfg = load_config(deployed=True)
    if cfg.dev_users:
        raise ConfigError("VOICE_DEV_USERS=1 takes any ?user= at its word: it is for local "
                          "runs and tests only; unset it (users come with the page's cookie "
                          "or a ?token= from your login system)")
    return cfg


def local() -> Flask:
    return _build(load_config, migrate=True)


def _build(config: Callable[[], Config], migrate: bool) -> Flask:
    try:
        cfg = config()
        ledger = Ledger.open(cfg.database_url, migrate=migrate)
    except VoiceError as e:
        log.critical("the webapp cannot start: %s", e)
        raise
    state = State(connect(cfg.redis_url or "", cfg.redis_master))   # deployed: required
    # only sends the scaler's kick by name: the webapp loads no task code, no cloud driver
    celery = Celery("voice", broker=cfg.redis_url)
    celery.conf.broker_transport_options = {"master_name": cfg.redis_master}
    app = create_app(cfg, state, lambda: celery.send_task("provisioner.scale"), ledger)
    before_serving(cfg, state)
    return app
