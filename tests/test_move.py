"""Planned moves without a gap (issue 10, item 6): a real browser streams through the real
page to a real node; deploying a new version drains that node, which tells the page to move;
the page opens the new stream before it stops the old one and crossfades.

The measure is the playback worklet's own: the longest run of silent output samples
(|x| < 1e-4, underruns included) while it plays the fake microphone's continuous tone. The
baseline test turns make-before-break off in the page and shows the same measure catching
the gap of the old way (wait for the node's 4503, then resume).
"""

from __future__ import annotations

import time
from typing import Any

from conftest import ControlPlane, lobby, start_stream
from playwright.sync_api import Browser, Page, expect
from test_page import browser, open_page, pw, tone_wav, wait_until  # noqa: F401  fixtures

from worker_node.runtime import MOVE_NOTICE_S

AFTER_SWITCH_S = 0.25   # the crossfade ended: what follows is the jitter buffer as ever
WARM_S = 5.0   # a v2 node is booted for another user before the v1 node says "move"
FRAME_MS = 20.0   # "no gap longer than one frame" (the page sends 10 ms frames: stricter still)


def _state(page: Page) -> dict[str, Any]:
    return dict(page.evaluate("""() => { const s = window.voiceState;
        return {session: s.session.id, node: s.session.nodeId, moves: s.moves,
                moving: s.moveFrom !== null, playback: s.playback,
                status: document.getElementById("status").textContent}; }"""))


def _stream_then_deploy(cp: ControlPlane, browser: Browser,  # noqa: F811
                        make_before_break: bool, held: list[Any]) -> tuple[Page, dict[str, Any]]:
    """Stream teto v1 for a while, reset the gap measure, deploy teto v2 (the v1 node
    drains at once), and wait until the session streams on a v2 node."""
    page = open_page(browser, cp.base_url)
    page.evaluate(f"() => {{ window.voiceConfig.MAKE_BEFORE_BREAK = "
                  f"{'true' if make_before_break else 'false'}; }}")
    page.select_option("#model", "teto")
    page.select_option("#region", "us-west")
    page.click("#start")
    expect(page.locator("body")).to_have_attribute("data-state", "streaming", timeout=30_000)
    page.wait_for_timeout(1500)   # playing steadily
    before = _state(page)
    page.evaluate("() => window.voiceState.audio.playback.port.postMessage('gap-reset')")
    # The v1 node tells its streams to move MOVE_NOTICE_S before its deadline. With
    # make-before-break off, the page waits for the node to cut the stream: a short drain
    # limit then keeps the test short.
    limit_s = MOVE_NOTICE_S + WARM_S if make_before_break else 1.0
    deployed = time.time()
    cp.state.deploy("teto", "2", 7.0, deployed + limit_s)
    if make_before_break:
        # A v2 node up (another user streams there) before the notice: booting a node
        # process beside the browser on this 2-core machine makes the jitter buffer run dry
        # for up to ~20 ms whether or not anything moves; in production it boots elsewhere.
        ready = lobby(cp.ws_url, "user=warm-v2&model=teto&region=us-west")[-1]
        held.append(start_stream(ready))
        print(f"\nv2 node {ready['node_id']} streaming {time.time() - deployed:.1f} s after "
              f"the deploy; the notice comes {limit_s - MOVE_NOTICE_S:.1f} s after it")

    def on_v2() -> bool:
        s = _state(page)
        rec = cp.state.node(s["node"]) if s["node"] else None
        return (rec is not None and rec.version == "2" and not s["moving"]
                and page.get_attribute("body", "data-state") == "streaming")

    wait_until(page, on_v2, "the session to stream on a v2 node", polls=300)
    page.wait_for_timeout(1000)   # a second on the new node, and a fresh worklet report
    after = _state(page)
    after["now"] = page.evaluate("() => window.voiceState.audio.ctx.currentTime")
    assert after["session"] == before["session"], (before, after)   # the same session
    assert after["node"] != before["node"]
    return page, {"before": before, "after": after}


def test_planned_move_has_no_gap(control_plane: ControlPlane,
                                 browser: Browser) -> None:  # noqa: F811
    page, seen = _stream_then_deploy(control_plane, browser, make_before_break=True, held=[])
    before, after = seen["before"], seen["after"]
    assert len(after["moves"]) == 1, after   # made before broken: the page switched itself
    move = after["moves"][0]
    assert (move["from"], move["to"]) == (before["node"], after["node"]), move
    # Across the move: from the node's notice until shortly after the crossfade ended.
    # The jitter buffer (20 ms target) also runs dry now and then without any move, when
    # the shared 2-core machine stalls the browser or a node (seen up to ~45 ms): such a
    # stall may fall inside the move's window too, so the bound is one frame, or the worst
    # silence of the same run outside the move if a stall made that longer.
    gaps = after["playback"]["gaps"]
    start, end = move["noticeAt"], move["at"] + AFTER_SWITCH_S
    inside = [start <= g["end"] and g["end"] - g["ms"] / 1000 <= end for g in gaps]
    across = [g["ms"] for g, i in zip(gaps, inside, strict=True) if i]
    elsewhere = [g["ms"] for g, i in zip(gaps, inside, strict=True) if not i]
    print(f"\nplanned move {move['from']} -> {move['to']}: notice to switch "
          f"{move['ms']:.0f} ms; longest silence across it {max(across, default=0):.1f} ms "
          f"(silences >= 2.7 ms: {across}); elsewhere in the same run: {elsewhere}")
    print("silences (ms, s from the switch):",
          [(round(g["ms"], 1), round(g["end"] - move["at"], 2)) for g in gaps])
    assert max(across, default=0.0) <= max([FRAME_MS, *elsewhere]), (across, gaps, move)
    page.click("#stop")
    page.context.close()


def test_break_before_make_leaves_a_gap(control_plane: ControlPlane,
                                        browser: Browser) -> None:  # noqa: F811
    """The baseline: with make-before-break off, the same move leaves a gap the measure
    sees (the node cuts the stream at its move deadline and the page resumes after it)."""
    page, seen = _stream_then_deploy(control_plane, browser, make_before_break=False, held=[])
    after = seen["after"]
    print(f"\nbreak-before-make: longest silence {after['playback']['longestGapMs']:.1f} ms")
    assert after["moves"] == [], after
    assert after["playback"]["longestGapMs"] > 10 * FRAME_MS, after
    page.click("#stop")
    page.context.close()
