"""The framework floor for the lobby: Flask + flask-sock served exactly as `voicectl run`
serves the webapp (werkzeug, a thread per connection), with a handler that only sends one
`ready`-sized message and closes. No Redis, no placement: what a burst costs before any of
our code runs.

    python bench/floor_server.py PORT
"""

from __future__ import annotations

import json
import logging
import os
import sys

from flask import Flask
from flask_sock import Sock
from werkzeug.serving import make_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import wsclose  # noqa: E402


def main() -> None:
    app = Flask(__name__)
    sock = Sock(app)

    @sock.route("/ws/session")
    def session(ws) -> None:  # type: ignore[no-untyped-def]
        ws.send(json.dumps({"type": "ready", "ticket": "x" * 240}))
        wsclose.close(ws, 1000, "ready")

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
