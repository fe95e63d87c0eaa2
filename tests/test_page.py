"""Browser tests of the page: Debian's Chromium with a fake microphone, against the real stack.

The fake microphone plays a 150 Hz harmonic tone. The test records what the page sends to
and receives from the node socket (not the lobby) and checks that the node's answer is
the tone shifted by the model's semitones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from common.package import load_manifest

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)

TONE_HZ = 150.0
WAV_RATE = 48000
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
]
REPO = Path(__file__).resolve().parent.parent

try:
    from research.quality import pitch_hz
except ImportError:  # the shared helper is not there yet: same measure, inline

    def pitch_hz(signal: np.ndarray, sr: int) -> float:
        import librosa

        f0 = librosa.yin(signal.astype(np.float32), fmin=50, fmax=1000, sr=sr, frame_length=2048)
        return float(np.median(f0))


@pytest.fixture(scope="module")
def tone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s of 16-bit mono 48 kHz harmonic tone (the fake mic loops it)."""
    t = np.arange(WAV_RATE * 4) / WAV_RATE
    x = sum(0.3 / k * np.sin(2 * np.pi * TONE_HZ * k * t) for k in (1, 2, 3))
    path = tmp_path_factory.mktemp("mic") / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WAV_RATE)
        w.writeframes((np.asarray(x) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def pw() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw: Playwright, tone_wav: Path) -> Iterator[Browser]:
    """Chromium that grants the microphone and feeds it the tone."""
    b = pw.chromium.launch(
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS
        + ["--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={tone_wav}"],
    )
    yield b
    b.close()


def open_page(browser: Browser, base_url: str) -> Page:
    page = browser.new_context(viewport={"width": 1000, "height": 760}).new_page()
    page.goto(base_url + "/")
    expect(page.locator("#start")).to_be_enabled(timeout=10_000)  # models loaded
    return page


def wait_until(page: Page, done: Callable[[], bool], what: str, polls: int = 150) -> None:
    """Poll `done` every 100 ms (while Playwright keeps dispatching events)."""
    for _ in range(polls):
        if done():
            return
        page.wait_for_timeout(100)
    pytest.fail(f"timed out waiting for {what}; page status: {page.inner_text('#status')!r}")


def pcm(frames: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(frames), "<i2").astype(np.float64) / 32768


def semitones(model) -> float:
    """A pitch voice's shift, from its package's params."""
    return float(load_manifest(model.package).params.get("semitones", 0.0))


def pick_model(models):
    """Prefer a clearly audible shift (+4 or +7 semitones), else the largest one."""
    for m in models:
        if semitones(m) in (4, 7):
            return m
    return max(models, key=lambda m: abs(semitones(m)))


def node_region(base_url: str, model: str) -> str:
    """The region of a ready node of `model` (the lobby queues in the region asked for)."""
    with urllib.request.urlopen(f"{base_url}/api/cluster", timeout=10) as r:
        nodes = json.load(r)["nodes"]
    return next(n["region"] for n in nodes if n["model"] == model and n["state"] == "ready")


LATENCY_TERMS = ("capture", "network", "model", "buffer", "output", "total")


def latency_terms(page: Page, reads: int = 5) -> list[dict[str, int]]:
    """The page's latency read-out, term by term, read a few times 0.3 s apart once every
    term is measured (the read-out is live: it changes between reads)."""
    def read() -> dict[str, str]:   # all terms in one go: the read-out updates 5x a second
        return page.evaluate("""(keys) => Object.fromEntries(keys.map(
            (k) => [k, document.getElementById(`lat-${k}`).textContent]))""",
                             list(LATENCY_TERMS))

    wait_until(page, lambda: all(v.endswith(" ms") for v in read().values()),
               "every latency term to be measured")
    page.wait_for_timeout(1000)   # let the smoothed terms settle
    out = []
    for _ in range(reads):
        out.append({k: int(v.removesuffix(" ms")) for k, v in read().items()})
        page.wait_for_timeout(300)
    return out


def started_latency_ms(received: list[str]) -> float:
    return float(next(json.loads(m) for m in received if '"started"' in m)["latency_ms"])


def frame_ms(sent_audio: list[bytes], sr: int) -> float:
    return 1000 * (len(sent_audio[-1]) // 2) / sr


def test_static_modules_are_served_as_javascript(webapp) -> None:
    """Module scripts load only with a JavaScript MIME type."""
    for name in sorted(p.name for p in (REPO / "webapp" / "static").glob("*.js")):
        with urllib.request.urlopen(f"{webapp.base_url}/static/{name}", timeout=10) as r:
            assert "javascript" in r.headers["Content-Type"], (name, r.headers["Content-Type"])
    html = urllib.request.urlopen(f"{webapp.base_url}/", timeout=10).read().decode()
    assert '<script type="module" src="/static/app.js">' in html


def test_streams_pitch_shifted_voice(stack, browser: Browser, tmp_path: Path) -> None:
    model = pick_model(stack.config.models)
    page = open_page(browser, stack.base_url)
    sent_text: list[str] = []
    sent_audio: list[bytes] = []
    received_audio: list[bytes] = []
    received_text: list[str] = []
    closed: list[str] = []

    def on_websocket(ws) -> None:
        if "ticket=" not in ws.url:  # the lobby, not the node
            return
        ws.on("framesent", lambda p: (sent_text if isinstance(p, str) else sent_audio).append(p))
        ws.on("framereceived",
              lambda p: (received_audio if isinstance(p, bytes) else received_text).append(p))
        ws.on("close", lambda _: closed.append(ws.url))

    page.on("websocket", on_websocket)
    page.select_option("#model", model.name)
    page.select_option("#region", node_region(stack.base_url, model.name))
    page.click("#start")

    wait_until(page, lambda: bool(sent_text), "the page's start message to the node")
    start = json.loads(sent_text[0])
    assert start["type"] == "start"
    sr = int(start["sample_rate"])
    wait_until(page, lambda: len(pcm(received_audio)) >= 2.5 * sr, "2.5 s of transformed audio")

    expect(page.locator("body")).to_have_attribute("data-state", "streaming")
    expect(page.locator("#status")).to_contain_text("Streaming")
    expect(page.locator("#lat-total")).to_contain_text("ms")
    reads = latency_terms(page)
    seen = page.evaluate("""() => { const s = window.voiceState, a = s.audio;
        return {rtts: s.latency.rttSamples.slice(), underruns: s.latency.underruns,
                base_ms: 1000 * a.ctx.baseLatency, output_ms: 1000 * a.ctx.outputLatency,
                input_ms: 1000 * a.inputLatencyS, hop_ms: s.latency.hopMs,
                fill_ms: s.latency.fillMs}; }""")
    rtts = seen.pop("rtts")
    print("\npage latency, mouth to ear (ms), read 5 times 0.3 s apart:\n  "
          + "\n  ".join(str(r) for r in reads) + "\n  browser: "
          + ", ".join(f"{k} {v:.1f}" for k, v in seen.items())
          + f"\n  per-frame round trips: p50 {np.percentile(rtts, 50):.1f} ms, "
          f"p99 {np.percentile(rtts, 99):.1f} ms over the last {len(rtts)} frames")
    model_ms = round(started_latency_ms(received_text))
    for terms in reads:
        parts = [terms[k] for k in LATENCY_TERMS[:-1]]
        assert terms["total"] == sum(parts), terms   # the total is the sum of what is shown
        assert terms["model"] == model_ms, terms
    # Loopback: the node answers a frame in a few ms (bench/audio.py), before the page has
    # even captured its next frame. A mean round trip beyond two and a half frame periods
    # would mean the term counts more than the wire and the node (the old read-out said
    # 21 ms here); stalls of a shared 2-core machine can raise it for a moment, hence the
    # median of the reads.
    period = frame_ms(sent_audio, sr)
    assert 0 <= np.median([r["network"] for r in reads]) <= 2.5 * period, (period, reads)

    # Skip the first 0.5 s (fake mic start-up, shifter warm-up), then compare 2 s.
    x_in = pcm(sent_audio)[sr // 2 : sr // 2 + 2 * sr]
    x_out = pcm(received_audio)[sr // 2 : sr // 2 + 2 * sr]
    f_in, f_out = pitch_hz(x_in, sr), pitch_hz(x_out, sr)
    expected = f_in * 2 ** (semitones(model) / 12)
    assert abs(1200 * np.log2(f_in / TONE_HZ)) < 50, f"fake mic pitch {f_in:.1f} Hz"
    cents = 1200 * np.log2(f_out / expected)
    assert abs(cents) < 50, (
        f"{model.name} ({semitones(model):+} st): in {f_in:.1f} Hz, out {f_out:.1f} Hz, "
        f"expected {expected:.1f} Hz ({cents:+.0f} cents)"
    )

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    if os.environ.get("SAVE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "screenshot.png")

    page.click("#stop")
    wait_until(page, lambda: bool(closed), "the node socket to close after Stop")
    expect(page.locator("body")).to_have_attribute("data-state", "stopped")
    expect(page.locator("#status")).to_contain_text("Stopped")
    expect(page.locator("#start")).to_be_enabled()
    page.context.close()


def test_unknown_model_shows_server_message(stack, browser: Browser) -> None:
    page = open_page(browser, stack.base_url)
    lobby_messages: list[dict] = []

    def on_websocket(ws) -> None:
        if "/ws/session" in ws.url:
            ws.on("framereceived", lambda p: lobby_messages.append(json.loads(p)))

    page.on("websocket", on_websocket)
    page.evaluate(
        """() => {
            const s = document.getElementById("model");
            s.add(new Option("no-such-voice", "no-such-voice"));
            s.value = "no-such-voice";
        }"""
    )
    page.click("#start")
    wait_until(page, lambda: any(m["type"] == "error" for m in lobby_messages), "a lobby error")
    error = next(m for m in lobby_messages if m["type"] == "error")
    assert error["code"] == "unknown_model"
    expect(page.locator("#status")).to_contain_text(error["message"])
    expect(page.locator("body")).to_have_attribute("data-state", "error")
    expect(page.locator("#start")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    page.context.close()


def test_microphone_refused_is_explained(stack, pw: Playwright) -> None:
    """Without --use-fake-ui-for-media-stream the permission prompt is denied."""
    b = pw.chromium.launch(
        executable_path=CHROMIUM, args=CHROMIUM_ARGS + ["--deny-permission-prompts"]
    )
    try:
        page = open_page(b, stack.base_url)
        page.click("#start")
        expect(page.locator("#status")).to_contain_text("Microphone access was refused")
        expect(page.locator("body")).to_have_attribute("data-state", "error")
        expect(page.locator("#start")).to_be_enabled()
        expect(page.locator("#stop")).to_be_disabled()
    finally:
        b.close()


def test_take_over_from_another_tab(stack, browser: Browser) -> None:
    """Two tabs of one user: the second is told where the stream is, takes it over, and the
    first says why it stopped."""
    model = pick_model(stack.config.models)
    region = node_region(stack.base_url, model.name)
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    tabs = []
    for _ in range(2):
        tab = context.new_page()   # one context: one cookie jar, one uid
        tab.goto(stack.base_url + "/")
        expect(tab.locator("#start")).to_be_enabled(timeout=10_000)
        tab.select_option("#model", model.name)
        tab.select_option("#region", region)
        tabs.append(tab)
    first, second = tabs
    first.click("#start")
    expect(first.locator("body")).to_have_attribute("data-state", "streaming", timeout=15_000)
    second.click("#start")
    expect(second.locator("#status")).to_contain_text("already streaming", timeout=10_000)
    expect(second.locator("#takeover")).to_be_visible()
    second.click("#takeover")
    expect(second.locator("body")).to_have_attribute("data-state", "streaming", timeout=15_000)
    expect(first.locator("#status")).to_contain_text("Taken over", timeout=10_000)
    expect(first.locator("#start")).to_be_enabled()
    context.close()


def test_minutes_used_today_are_shown(stack, browser: Browser) -> None:
    from billing.ledger import Ledger

    page = open_page(browser, stack.base_url)
    expect(page.locator("#uid")).to_have_text(re.compile(r"^u-[0-9a-f]{16}$"))  # the server's
    uid = page.inner_text("#uid")
    minute = int(time.time() // 86400) * 86400          # 00:00 UTC today: always "today"
    stack.state.report_usage([(minute, f"{uid}|s1|n1|miku|us-west", 60.0),
                              (minute + 60, f"{uid}|s1|n1|miku|us-west", 30.0)])
    Ledger.open(stack.config.database_url).settle_from(stack.state, minute + 600)
    page.reload()
    expect(page.locator("#usage")).to_contain_text("Minutes used today: 1.5")
    page.context.close()


def test_cold_start_shows_queue_and_boot_progress_then_streams(control_plane,
                                                               browser: Browser) -> None:
    """With no node anywhere, the page shows the queue and a moving boot progress bar with
    the ETA, then streams once the control plane has booted a node."""
    page = open_page(browser, control_plane.base_url)
    states: list[str] = []
    page.select_option("#model", "teto")
    page.select_option("#region", "ap-northeast")
    page.click("#start")
    deadline = time.monotonic() + 20   # the scaler's task may wait behind others
    while time.monotonic() < deadline:
        states.append(page.get_attribute("body", "data-state") or "")
        if states[-1] in ("booting", "streaming"):
            break
        page.wait_for_timeout(50)
    assert states[-1] == "booting", sorted(set(states))
    expect(page.locator("#boot")).to_be_visible()
    expect(page.locator("#boot-left")).to_contain_text("s")
    expect(page.locator("#status")).to_contain_text("ap-northeast")
    expect(page.locator("body")).to_have_attribute("data-state", "streaming", timeout=30_000)
    expect(page.locator("#boot")).to_be_hidden()
    page.click("#stop")
    page.context.close()


def test_page_names_its_user_without_dev_users(stack, browser: Browser) -> None:
    """As deployed (no ?user=): the page streams as the server's cookie user, and as the
    user of a token an integration put in its URL, whose usage it shows."""
    from conftest import serve

    from billing.ledger import Ledger
    from common.identity import mint_token
    from webapp.app import create_app

    cfg = stack.config.with_overrides(dev_users=False)
    host, server = serve(create_app(cfg, stack.state, ledger=Ledger.open(cfg.database_url)))
    token = mint_token("carol", cfg.user_token_secret, now=time.time(), ttl_s=600)
    model = pick_model(cfg.models)
    region = node_region(stack.base_url, model.name)
    try:
        for query, user in (("", re.compile(r"^u-[0-9a-f]{16}$")), (f"?token={token}", "carol")):
            page = browser.new_context().new_page()
            page.goto(f"http://{host}/{query}")
            expect(page.locator("#uid")).to_have_text(user)
            page.select_option("#model", model.name)
            page.select_option("#region", region)
            page.click("#start")
            expect(page.locator("body")).to_have_attribute("data-state", "streaming",
                                                           timeout=15_000)
            uid = page.inner_text("#uid")
            assert stack.state.lock_holder(uid), uid
            page.click("#stop")
            page.context.close()
    finally:
        server.shutdown()


def test_the_page_retries_the_lobby_while_the_server_is_unavailable(
        browser: Browser, cfg, tmp_path: Path) -> None:  # noqa: ANN001
    """The control plane's state store goes away after the page loaded: Start is answered
    `unavailable`, and the page says it tries again, and does, with backoff, until the
    store is back and the user is queued (no node exists here)."""
    from conftest import serve

    from provisioner.state import State, connect
    from voicectl import procs
    from webapp.app import create_app

    url, redis_proc = procs.start_redis(data_dir=tmp_path / "redis")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    host, server = serve(create_app(cfg.with_overrides(redis_url=url), State(connect(url))))
    try:
        page = open_page(browser, f"http://{host}")
        procs.stop([redis_proc])                      # the state store goes away
        page.click("#start")
        expect(page.locator("#status")).to_contain_text("trying again in", timeout=20_000)
        first = page.inner_text("#status")
        _, redis_proc = procs.start_redis(port=port, data_dir=tmp_path / "redis")   # back
        expect(page.locator("#status")).to_contain_text("Queued", timeout=30_000)
        assert "unavailable" in first, first
    finally:
        procs.stop([redis_proc])
        server.shutdown()
