"""The webapp alone, served exactly as `voicectl run` serves it (the same `create_app`,
werkzeug with a thread per connection, the same `before_serving`), for bench/scale.py.

No Celery worker and no Flower: the autoscaler would start retiring a thousand idle
simulated nodes, and the benchmark measures the webapp process, not the control loop.

    REDIS_URL=... DATABASE_URL=... python bench/scale_server.py PORT
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import threading

from werkzeug.serving import make_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from billing.ledger import Ledger  # noqa: E402
from common.config import load_config  # noqa: E402
from provisioner import catalog
from provisioner.state import State, connect  # noqa: E402
from webapp.app import before_serving, create_app  # noqa: E402


def main() -> None:
    port = int(sys.argv[1])
    # A keep-alive connection per node holds a socket (and a thread) here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    cfg = load_config(os.environ).with_overrides(public_url=f"http://127.0.0.1:{port}")
    if not cfg.redis_url:
        sys.exit("bench/scale_server.py: set REDIS_URL (bench/scale.py starts a Redis and sets it)")
    state = State(connect(cfg.redis_url))
    catalog.seed(state, cfg)
    server = make_server("127.0.0.1", port,
                         create_app(cfg, state, ledger=Ledger.open(cfg.database_url)),
                         threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    before_serving(cfg, state)   # as voicectl run does
    server.serve_forever()


if __name__ == "__main__":
    main()
