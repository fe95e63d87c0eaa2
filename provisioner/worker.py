"""The Celery worker's and beat's entry point: `celery -A provisioner.worker worker -E`.

This is a process boundary, so it is where the configuration is read from the environment,
as a deployment's: REDIS_URL, DATABASE_URL, TICKET_SECRET and VOICE_PUBLIC_URL must be
given (`voicectl run` gives its own), and the billing schema must be migrated already
(`voicectl migrate`).
"""

import os

from celery.signals import worker_init

from common.config import load_config
from provisioner.tasks import make_celery

cfg = load_config(deployed=True)
app = make_celery(cfg)


@worker_init.connect
def _metrics(**_: object) -> None:
    """VOICE_METRICS_PORT: the worker serves /metrics there too (Prometheus scrapes it)."""
    port = os.environ.get("VOICE_METRICS_PORT")
    if port:
        from provisioner import metrics
        from provisioner.state import State, connect
        metrics.serve(State(connect(cfg.redis_url or "", cfg.redis_master)), int(port))
