"""The framework floor for the lobby: Flask + flask-sock served exactly as `voicectl run`
serves the webapp (gunicorn's gevent worker, a greenlet per connection), with a handler
that only sends one `ready`-sized message and closes. No Redis, no placement: what a burst
costs before any of our code runs.

    python -m gunicorn -k gevent --workers 1 --bind 127.0.0.1:PORT --chdir bench floor_server:app
"""

from __future__ import annotations

import json
import os
import sys

from flask import Flask
from flask_sock import Sock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import wsclose  # noqa: E402

app = Flask(__name__)
sock = Sock(app)


@sock.route("/ws/session")
def session(ws) -> None:  # type: ignore[no-untyped-def]
    ws.send(json.dumps({"type": "ready", "ticket": "x" * 240}))
    wsclose.close(ws, 1000, "ready")
