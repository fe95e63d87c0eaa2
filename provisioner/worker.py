"""The Celery worker's entry point: `celery -A provisioner.worker worker -B -E`.

This is a process boundary, so it is where the configuration is read from the environment.
"""

from common.config import load_config
from provisioner.tasks import make_celery

app = make_celery(load_config())
