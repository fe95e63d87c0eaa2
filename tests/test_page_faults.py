"""The page where the network and the nodes misbehave, in Debian's Chromium: a node whose
model hangs (the page's watchdog moves on), and regions at different distances (the page
times their beacons and is placed by what it measured)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect
from test_page import CHROMIUM, browser, open_page, pw, tone_wav, wait_until  # noqa: F401

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")


STALLS_ONCE = '''
import os
import time


class Stalls:
    latency_samples = 0

    def __init__(self, marker):
        self.marker, self.calls = marker, 0

    def process(self, frames):
        self.calls += 1
        if self.calls == 30 and not os.path.exists(self.marker):   # the first node's only
            open(self.marker, "w").close()
            time.sleep(6.0)   # a GPU call that hangs, while the process and heartbeats live
        return frames


def make(sample_rate, params, files):
    return Stalls(params["marker"])
'''


def test_the_page_leaves_a_node_that_stopped_answering(  # noqa: F811
        browser: Browser, webapp, fleet, tmp_path: Path) -> None:  # noqa: ANN001, F811
    """The node's model call hangs (its socket and heartbeats live on): the page's watchdog
    leaves it after STALL_MS without audio and resumes through the lobby on another node,
    long before the hang ends, and plays again there."""
    from conftest import push_version

    pkg = tmp_path / "stall"
    pkg.mkdir()
    (pkg / "model.toml").write_text('name = "miku"\nentry = "stall:make"\n\n[params]\n'
                                    f'marker = "{tmp_path / "stalled"}"\n')
    (pkg / "stall.py").write_text(STALLS_ONCE)
    push_version(webapp.state, webapp.config, "miku", package=pkg)
    first = fleet.start("miku")
    page = open_page(browser, webapp.base_url)
    opened: list[tuple[float, str]] = []
    answers: dict[str, list[float]] = {}

    def on_socket(ws) -> None:  # noqa: ANN001
        if "ticket=" not in ws.url:
            return   # the lobby's
        opened.append((time.monotonic(), ws.url))
        got = answers.setdefault(ws.url, [])
        ws.on("framereceived", lambda payload: got.append(time.monotonic())
              if isinstance(payload, bytes) else None)

    page.on("websocket", on_socket)
    page.select_option("#model", "miku")
    page.select_option("#region", "us-west")
    page.click("#start")
    expect(page.locator("body")).to_have_attribute("data-state", "streaming", timeout=15_000)
    fleet.start("miku")   # somewhere to go
    wait_until(page, lambda: len(opened) >= 2, "the page to leave the stalled node")
    left_at, second = opened[1]
    silent_from = max(t for t in answers[opened[0][1]] if t < left_at)
    assert 1.0 < left_at - silent_from < 5.0, left_at - silent_from   # STALL_MS, then the lobby
    wait_until(page, lambda: len(answers.get(second, [])) > 50, "audio from the next node")
    assert answers[second][0] - silent_from < 6.0   # playing again before the hang ended
    assert first not in second
    page.context.close()


def test_the_page_places_by_the_round_trips_it_measured(  # noqa: F811
        browser: Browser, cfg, state, tmp_path: Path) -> None:  # noqa: ANN001, F811
    """Each region's beacon answers late to play geography (us-east 2 ms, the others
    150 ms): the page times them within a second of loading, sends them with its lobby
    request, and streams from us-east, though its time zone guesses it elsewhere."""
    from dataclasses import replace

    from conftest import Fleet, serve

    from voicectl import procs
    from webapp.app import create_app

    regions = tuple(replace(r, beacon_delay_ms=2.0 if r.name == "us-east" else 150.0)
                    for r in cfg.regions)
    cfg = cfg.with_overrides(regions=regions)
    host, server = serve(create_app(cfg, state))
    fleet = Fleet(cfg, state, tmp_path, f"http://{host}")
    try:
        east = fleet.start("miku", "us-east")
        fleet.start("miku", "us-west")
        page = open_page(browser, f"http://{host}")
        wait_until(page, lambda: len(page.evaluate("window.voiceState.rtts")) == len(regions),
                   "every region's beacon to be timed")
        rtts = page.evaluate("window.voiceState.rtts")
        assert rtts["us-east"] + 10 < min(v for k, v in rtts.items() if k != "us-east"), rtts
        nodes: list[str] = []
        page.on("websocket", lambda ws: nodes.append(ws.url) if "ticket=" in ws.url else None)
        page.select_option("#model", "miku")
        page.click("#start")
        expect(page.locator("body")).to_have_attribute("data-state", "streaming",
                                                       timeout=15_000)
        assert nodes and nodes[0].startswith(fleet.url(east)), (nodes, fleet.url(east))
        page.context.close()
    finally:
        procs.stop(fleet.procs)
        server.shutdown()
