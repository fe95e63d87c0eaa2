"""The audio stream protocol's limits and message parsing (docs/protocol.md). No I/O."""

from __future__ import annotations

import math

from common.errors import VoiceError
from common.jsonobj import json_object

MIN_RATE_HZ, MAX_RATE_HZ = 8000, 48000
MIN_FRAME_S, MAX_FRAME_S = 0.010, 0.100
START_TIMEOUT_S = 10.0      # a client that connects but never says start is dropped
IDLE_TIMEOUT_S = 30.0       # a stream that sends nothing for this long is closed
MAX_MESSAGE_BYTES = 1024 * 1024   # far above a legal frame (100 ms at 48 kHz: 9,600 bytes)


class Malformed(VoiceError):
    """A client frame or message breaks the protocol; the text says what and how to fix it."""


def parse_json(msg: str) -> dict[str, object]:
    try:
        return json_object(msg)
    except ValueError as e:
        raise Malformed(f"text message {msg[:40]!r} is {e}: send a JSON object with a "
                        "'type'") from None


def parse_start(msg: str | bytes) -> int:
    """The sample rate a `start` message asks for."""
    if isinstance(msg, bytes):
        raise Malformed('expected {"type": "start", "sample_rate": N} before audio frames')
    data = parse_json(msg)
    if data.get("type") != "start":
        raise Malformed(f"first message must be type 'start', got {data.get('type')!r}")
    rate = data.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int) \
            or not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise Malformed(f"sample_rate {rate!r} is not an integer in "
                        f"{MIN_RATE_HZ}-{MAX_RATE_HZ} Hz")
    return rate


def frame_bounds(rate: int) -> tuple[int, int]:
    """Fewest and most samples a legal frame holds at `rate`."""
    return int(rate * MIN_FRAME_S), math.ceil(rate * MAX_FRAME_S)


def check_frame(nbytes: int, rate: int, bounds: tuple[int, int]) -> int:
    """Samples in a binary frame of `nbytes`, or Malformed saying how to fix it."""
    if nbytes % 2:
        raise Malformed(f"binary frame of {nbytes} bytes is not 16-bit PCM "
                        "(odd length); send mono Int16 little-endian samples")
    n = nbytes // 2
    lo, hi = bounds
    if not lo <= n <= hi:
        raise Malformed(f"frame of {n} samples is {1000 * n / rate:.1f} ms at {rate} Hz;"
                        f" frames must be 10-100 ms ({lo}-{hi} samples)")
    return n


def check_text(msg: str) -> None:
    """A text message while streaming: returns on `stop`, else Malformed."""
    kind = parse_json(msg).get("type")
    if kind != "stop":
        raise Malformed(f"unexpected message type {kind!r} while streaming; "
                        'send binary audio frames or {"type": "stop"}')
