"""The webapp for a WSGI server in deployments, built from the environment:

    gunicorn -k gthread --threads 200 --bind 0.0.0.0:8000 webapp.wsgi:app

Every WebSocket holds one of gunicorn's threads while it is open: a lobby while its user
waits, and each node's heartbeat socket for the node's whole life. Size `--threads` to the
nodes plus the lobbies open at once plus a few for HTTP (docs/architecture.md, "Serving the
webapp"). The process refuses to start without what a deployment shares (REDIS_URL,
DATABASE_URL, TICKET_SECRET) and with a billing database `voicectl migrate` has not brought
to this code's schema. Do not `--preload`: each worker builds its app after the fork.
"""

from __future__ import annotations

import logging

from celery import Celery

from billing.ledger import Ledger
from common.config import load_config
from common.errors import VoiceError
from provisioner.state import State, connect
from webapp.app import before_serving, create_app

log = logging.getLogger("webapp.wsgi")

try:
    cfg = load_config(deployed=True)
    ledger = Ledger.open(cfg.database_url, migrate=False)
except VoiceError as e:
    log.critical("the webapp cannot start: %s", e)
    raise
state = State(connect(cfg.redis_url or ""))   # load_config(deployed=True) required it
# only sends the scaler's kick by name: the webapp loads no task code, no cloud driver
celery = Celery("voice", broker=cfg.redis_url)
app = create_app(cfg, state, lambda: celery.send_task("provisioner.scale"), ledger)
before_serving(cfg, state)
