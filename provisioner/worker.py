"""The Celery worker's and beat's entry point: `celery -A provisioner.worker worker -E`.

This is a process boundary, so it is where the configuration is read from the environment,
as a deployment's: REDIS_URL, DATABASE_URL, TICKET_SECRET and VOICE_PUBLIC_URL must be
given (`voicectl run` gives its own), and the billing schema must be migrated already
(`voicectl migrate`).
"""

from common.config import load_config
from provisioner.tasks import make_celery

app = make_celery(load_config(deployed=True))
