"""The webapp's WebSocket closing, so browsers see the close frame.

Under werkzeug's server, flask-sock writes an HTTP response onto the socket after the
handler returns; Chrome reads it as an invalid frame, drops the last messages and reports
every close as 1006. Shutting the TCP socket down right after the close frame prevents it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from simple_websocket import ConnectionClosed

CLOSE_LINGER_S = 0.05   # between our close frame and the end of the TCP stream (see close)


def fit(reason: str) -> str:
    """A close reason cut to the 123 bytes a close frame allows."""
    raw = reason.encode()
    return raw[:120].decode(errors="ignore") + "..." if len(raw) > 123 else reason


def close(ws: Any, code: int = 1000, reason: str = "") -> None:
    """Send a close frame (reason cut to the 123 bytes a frame allows), then end the TCP
    stream. Safe to call twice and from another thread."""
    try:
        ws.close(code, fit(reason))
    except (ConnectionClosed, OSError):
        pass
    # The socket is closed soon after: with the client's frames still arriving, that sends
    # a reset, which can reach the browser before it has read our close frame (it then
    # reports 1006 and resumes instead of obeying the code). Give the frame a moment first.
    time.sleep(CLOSE_LINGER_S)
    try:
        ws.sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


# A message that shares a TCP segment with the 101 answer is lost by simple_websocket's
# client (its handshake keeps only the first event of its read): it sees 1005 instead of
# our close code, and no error text. Refusals right after the handshake are rare, so they
# wait out the client's read first.
REFUSAL_GAP_S = 0.02


def after_handshake() -> None:
    """Call before a refusal sent right after the handshake (see REFUSAL_GAP_S)."""
    time.sleep(REFUSAL_GAP_S)
