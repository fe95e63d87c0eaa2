// Voice changer page: microphone -> node (pitch-shifting worker) -> speakers.
// Flow: Start -> open audio (one AudioContext, two worklets) -> lobby socket
// (queued / booting / ready) -> node socket with the ticket -> stream 20 ms frames.
// Protocol: see docs/protocol.md. Plain script, no build step.
"use strict";

const FRAME_MS = 20; // capture frame size sent to the node
const JITTER_TARGET_MS = 30; // playback starts once this much audio is buffered
const JITTER_MAX_MS = 80; // above this the playback worklet drops the oldest audio
// Node losses in a row before giving up. Backoff 1, 2, 4, 8 s: the later tries come
// after the control plane's heartbeat timeout (6 s), when it no longer offers a dead node.
const MAX_RETRIES = 4;
const RETRY_BASE_MS = 1000;
const STABLE_MS = 10000; // streaming this long on a node resets the retry count
const MAX_UNSENT_BYTES = 96000; // ~1 s at 48 kHz: skip frames rather than queue latency

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), region: $("region"), start: $("start"), stop: $("stop"),
  status: $("status"), boot: $("boot"), bootFill: $("boot-fill"), bootLeft: $("boot-left"),
  takeover: $("takeover"), usage: $("usage"), uid: $("uid"),
  scopeIn: $("scope-in"), scopeOut: $("scope-out"),
  lat: { shifter: $("lat-shifter"), network: $("lat-network"), buffer: $("lat-buffer"),
    io: $("lat-io"), total: $("lat-total") },
};

const uid = userId();
let modelsLoaded = false;
let active = false; // the user wants to stream: between Start and Stop or a fatal error
let attempt = 0; // bumps on every Start, so a stale Start (Stop pressed meanwhile) gives up
let audio = null; // {ctx, stream, capture, playback, inAnalyser, outAnalyser}
let lobby = null; // current lobby WebSocket
let node = null; // current node WebSocket
let nodeClosing = Promise.resolve(); // resolves once a stopped node socket has closed
let streaming = false; // node answered "started"
let session = { id: null, region: null, nodeId: null };
let retries = 0;
let retryTimer = null;
let startedAt = 0; // performance.now() of the last "started"
let boot = null; // {start, deadline} in performance.now() ms while a node boots
let lastNodeError = "";
const lat = { shifterMs: null, rttMs: null, bufferMs: null };
let rtt = { pending: [], sent: 0, received: 0 }; // for per-frame round trip

// ---- identity, status, buttons --------------------------------------------

function userId() {
  const m = document.cookie.match(/(?:^|;\s*)uid=([^;]+)/);
  if (m) return decodeURIComponent(m[1]);
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  const id = "u-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  document.cookie = `uid=${id}; path=/; max-age=31536000; SameSite=Lax`;
  return id;
}

// kind: "busy" | "ok" | "error" | "idle" (colour); state goes on <body data-state>.
function setStatus(text, kind, state) {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
  document.body.dataset.state = state;
}

function setButtons() {
  ui.start.disabled = active || !modelsLoaded;
  ui.stop.disabled = !active;
  ui.model.disabled = active || !modelsLoaded;
  ui.region.disabled = active;
}

// ---- models, regions, usage -------------------------------------------------

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path} answered HTTP ${r.status}`);
  return r.json();
}

async function loadModels() {
  try {
    const models = (await getJson("/api/models")).filter((m) => m.state === "live");
    const names = [...new Map(models.map((m) => [m.name, m])).values()];
    ui.model.replaceChildren(...names.map((m) => new Option(`${m.name} (v${m.version})`, m.name)));
    modelsLoaded = names.length > 0;
    if (modelsLoaded) setStatus("Ready. Pick a voice and press Start.", "idle", "idle");
    else setStatus("No voices are available right now. Try again later.", "error", "error");
  } catch (err) {
    modelsLoaded = false;
    setStatus("Cannot reach the server (loading voices failed). Retrying…", "error", "error");
    setTimeout(loadModels, 3000);
  }
  setButtons();
}

async function loadRegions() {
  try {
    for (const r of await getJson("/api/regions")) {
      ui.region.add(new Option(`${r.name} (${r.provider})`, r.name));
    }
  } catch (err) {
    /* keep "Nearest (auto)" only */
  }
}

async function refreshUsage() {
  try {
    const u = await getJson(`/api/usage?user=${encodeURIComponent(uid)}`);
    const today = new Date().toISOString().slice(0, 10);
    const secs = Array.isArray(u.minutes)
      ? u.minutes.filter((m) => m.minute.startsWith(today)).reduce((a, m) => a + m.seconds, 0)
      : u.seconds;
    ui.usage.textContent = `Minutes used today: ${(secs / 60).toFixed(1)}`;
    ui.usage.hidden = false;
  } catch (err) {
    ui.usage.hidden = true; // endpoint missing or server down: say nothing
  }
}

// ---- start / stop -------------------------------------------------------------

async function start(takeover = false) {
  if (active) return;
  const mine = ++attempt;
  active = true;
  retries = 0;
  startedAt = 0;
  session = { id: null, region: null, nodeId: null };
  ui.takeover.hidden = true;
  setButtons();
  setStatus("Asking for the microphone…", "busy", "connecting");
  let opened;
  try {
    opened = await openAudio();
  } catch (err) {
    if (mine === attempt && active) fail(micMessage(err));
    return;
  }
  if (mine !== attempt || !active) return closeAudio(opened); // Stop pressed meanwhile
  audio = opened;
  await nodeClosing; // let a just-stopped stream release the single-stream lock
  if (mine === attempt && active) openLobby({ takeover });
}

function stop() {
  teardown();
  setStatus("Stopped.", "idle", "stopped");
}

// Show an error and put everything back to idle.
function fail(message) {
  teardown();
  setStatus(message, "error", "error");
}

function teardown() {
  active = false;
  streaming = false;
  clearTimeout(retryTimer);
  hideBoot();
  closeLobby();
  closeNode(true);
  closeAudio();
  lat.shifterMs = lat.rttMs = lat.bufferMs = null;
  setButtons();
  refreshUsage();
}

function micMessage(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" || name === "SecurityError") {
    return "Microphone access was refused. Allow the microphone for this site (icon in the address bar) and press Start again.";
  }
  if (name === "NotFoundError" || name === "OverconstrainedError") {
    return "No microphone was found. Plug one in and press Start again.";
  }
  if (name === "NotReadableError") {
    return "The microphone is busy or unavailable (another app may be using it). Press Start to retry.";
  }
  if (name === "ServerDown") return `${err.message} Press Start to retry.`;
  return `Could not start audio: ${(err && err.message) || err}. Press Start to retry.`;
}

// ---- audio graph -----------------------------------------------------------------

async function openAudio() {
  // Create the context inside the click so autoplay rules allow it to run.
  const ctx = new AudioContext({ latencyHint: "interactive" });
  let stream = null;
  try {
    if (!navigator.mediaDevices) throw new DOMException("no mediaDevices", "SecurityError");
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false,
        channelCount: 1 },
    });
    try {
      await ctx.audioWorklet.addModule("/static/capture-worklet.js");
      await ctx.audioWorklet.addModule("/static/playback-worklet.js");
    } catch (err) {
      throw new DOMException(`Cannot load the audio code from ${location.host}: is the server running?`, "ServerDown");
    }
    await ctx.resume();
  } catch (err) {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    ctx.close();
    throw err;
  }
  const frameSamples = Math.round((ctx.sampleRate * FRAME_MS) / 1000);
  const source = ctx.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(ctx, "capture", { processorOptions: { frameSamples } });
  const playback = new AudioWorkletNode(ctx, "playback", {
    numberOfInputs: 0, outputChannelCount: [1],
    processorOptions: { targetMs: JITTER_TARGET_MS, maxMs: JITTER_MAX_MS },
  });
  const inAnalyser = ctx.createAnalyser();
  const outAnalyser = ctx.createAnalyser();
  source.connect(inAnalyser);
  source.connect(capture);
  capture.connect(ctx.destination); // silent output; keeps the capture node pulled
  playback.connect(outAnalyser);
  outAnalyser.connect(ctx.destination);
  capture.port.onmessage = (e) => sendFrame(e.data);
  playback.port.onmessage = (e) => { lat.bufferMs = e.data.bufferedMs; };
  return { ctx, stream, capture, playback, inAnalyser, outAnalyser };
}

function closeAudio(a = audio) {
  if (!a) return;
  a.stream.getTracks().forEach((t) => t.stop());
  a.capture.port.onmessage = a.playback.port.onmessage = null;
  a.ctx.close();
  if (a === audio) audio = null;
}

// ---- lobby -------------------------------------------------------------------------

function guessLocation() {
  // No geolocation prompt: the time zone offset gives a rough longitude (15 deg/hour).
  const lon = Math.max(-180, Math.min(180, -new Date().getTimezoneOffset() / 4));
  return { lat: 40, lon };
}

function lobbyUrl({ takeover, resume }) {
  const q = new URLSearchParams({ user: uid, model: ui.model.value });
  if (ui.region.value) q.set("region", ui.region.value);
  else {
    const loc = guessLocation();
    q.set("lat", loc.lat);
    q.set("lon", loc.lon);
  }
  if (resume) q.set("resume", resume);
  if (takeover) q.set("takeover", "1");
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ws/session?${q}`;
}

function openLobby(opts) {
  closeLobby();
  const ws = new WebSocket(lobbyUrl(opts));
  let opened = false;
  let refused = false; // the server sent an error message
  let readied = false; // the server sent "ready": closing afterwards is normal
  lobby = ws;
  if (!opts.resume) setStatus("Connecting to the server…", "busy", "connecting");
  ws.onopen = () => { opened = true; };
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.type === "error") refused = true;
    if (m.type === "ready") readied = true;
    if (lobby === ws) onLobbyMessage(m);
  };
  ws.onclose = () => {
    if (lobby !== ws) return; // replaced or closed on purpose
    lobby = null;
    // Closing after "ready" is normal: node loss is handled by the node socket.
    if (!active || refused || readied) return;
    if (opts.resume || session.id) {
      // We hold a session (queued, booting or resuming): rejoin it, a few times.
      const why = opened ? "the server closed the lobby" : "the server is unreachable";
      nodeLost(why, "Connection to the server lost");
    } else if (!opened) {
      fail(`Cannot reach the server at ${location.host}: is it running? Press Start to retry.`);
    } else {
      fail("The server closed the connection before a voice node was ready. Press Start to retry.");
    }
  };
}

function closeLobby() {
  const ws = lobby;
  lobby = null;
  if (ws) ws.close(1000);
}

function onLobbyMessage(m) {
  if (m.session_id) session.id = m.session_id;
  switch (m.type) {
    case "queued":
      hideBoot();
      setStatus(`Queued: #${m.position} in line for ${ui.model.value} in ${m.region}. Waiting for a free slot…`, "busy", "queued");
      break;
    case "booting":
      showBoot(m.eta_s);
      setStatus(`Starting a voice node for you in ${m.region}…`, "busy", "booting");
      break;
    case "ready":
      clearTimeout(retryTimer);
      hideBoot();
      connectNode(m);
      break;
    case "drain":
      if (streaming && !ui.status.textContent.includes("draining")) {
        setStatus(`${ui.status.textContent} (node draining: you will be moved)`, "ok", "streaming");
      }
      break;
    case "error":
      fail(m.message || `The server refused: ${m.code}`);
      if (m.code === "already_streaming") ui.takeover.hidden = false;
      break;
    default:
      break; // newer server events: ignore
  }
}

// Boot progress: the bar fills toward the latest ETA and is animated in draw().
function showBoot(etaS) {
  const now = performance.now();
  if (!boot) boot = { start: now };
  boot.deadline = now + Math.max(0, etaS) * 1000;
  ui.boot.hidden = false;
}

function hideBoot() {
  boot = null;
  ui.boot.hidden = true;
  ui.bootFill.style.width = "0";
  ui.bootLeft.textContent = "";
}

// ---- node ------------------------------------------------------------------------------

function connectNode(m) {
  closeNode(false); // a new "ready" while streaming means: switch nodes
  session.region = m.region;
  session.nodeId = m.node_id;
  lastNodeError = "";
  const ws = new WebSocket(`${m.node_url}?ticket=${encodeURIComponent(m.ticket)}`);
  ws.binaryType = "arraybuffer";
  node = ws;
  setStatus(`Connecting to node ${m.node_id} in ${m.region}…`, "busy", "connecting");
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", sample_rate: audio.ctx.sampleRate }));
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return onNodeAudio(e.data);
    const msg = JSON.parse(e.data);
    if (msg.type === "started") onStarted(msg);
    else if (msg.type === "error") lastNodeError = msg.message || msg.code || "";
  };
  ws.onclose = (e) => onNodeClose(ws, e.code);
}

function onStarted(m) {
  streaming = true;
  startedAt = performance.now();
  lat.shifterMs = m.latency_ms;
  lat.rttMs = null;
  rtt = { pending: [], sent: 0, received: 0 };
  audio.playback.port.postMessage("reset");
  setStatus(`Streaming ${m.model || ui.model.value} on node ${session.nodeId} in ${session.region}.`, "ok", "streaming");
}

function sendFrame(buf) {
  if (!streaming || !node || node.readyState !== WebSocket.OPEN) return;
  if (node.bufferedAmount > MAX_UNSENT_BYTES) return; // congested: drop, never queue
  node.send(buf);
  rtt.sent += buf.byteLength >> 1;
  rtt.pending.push({ end: rtt.sent, t: performance.now() });
}

// Output sample k answers input sample k: the send time of the input frame that
// ends where the output now ends gives one round-trip sample (smoothed).
function onNodeAudio(buf) {
  if (!audio) return;
  rtt.received += buf.byteLength >> 1;
  let sentAt = null;
  while (rtt.pending.length && rtt.pending[0].end <= rtt.received) sentAt = rtt.pending.shift().t;
  if (sentAt !== null) {
    const ms = performance.now() - sentAt;
    lat.rttMs = lat.rttMs === null ? ms : lat.rttMs * 0.9 + ms * 0.1;
  }
  audio.playback.port.postMessage(buf, [buf]);
}

function onNodeClose(ws, code) {
  if (node !== ws) return; // an old node we left on purpose
  console.info(`node socket closed with code ${code}`);
  node = null;
  streaming = false;
  if (!active) return;
  if (code === 4409) {
    fail("Taken over: you started streaming somewhere else (another tab or device), so this stream stopped.");
  } else if (code === 4401) {
    fail("The voice node refused the session ticket (expired or invalid). Press Start to try again.");
  } else if (code === 4400) {
    fail(`The voice node rejected our audio: ${lastNodeError || "malformed message"}. Press Start to try again.`);
  } else {
    nodeLost(`close code ${code}`); // 1011 model failed, 4503 full/draining, 1006 dropped, ...
  }
}

// Resume the same session through the lobby, with backoff, a few times.
// `what` starts the status line ("Node lost, reconnecting…").
function nodeLost(why, what = "Node lost") {
  // Reset only after a stable stretch, so a crash loop (or two tabs fighting over
  // one user's stream) still ends after MAX_RETRIES.
  if (startedAt && performance.now() - startedAt > STABLE_MS) retries = 0;
  startedAt = 0;
  if (retries >= MAX_RETRIES) {
    const detail = lastNodeError ? `: ${lastNodeError}` : ` (${why})`;
    fail(`${what} and ${MAX_RETRIES} reconnects failed${detail}. Press Start to try again.`);
    return;
  }
  retries++;
  setStatus(`${what}, reconnecting… (attempt ${retries} of ${MAX_RETRIES})`, "busy", "reconnecting");
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => openLobby({ resume: session.id }), RETRY_BASE_MS * 2 ** (retries - 1));
}

// sendStop: ask the node to flush and close (1000); force-close after 1 s.
function closeNode(sendStop) {
  const ws = node;
  node = null;
  if (!ws) return;
  ws.onopen = ws.onmessage = null;
  if (sendStop && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: "stop" }));
    nodeClosing = new Promise((resolve) => {
      ws.onclose = resolve;
      setTimeout(() => { ws.close(1000); resolve(); }, 1000);
    });
  } else {
    ws.onclose = null;
    ws.close(1000);
  }
}

// ---- drawing ------------------------------------------------------------------------------

function drawScope(canvas, analyser, colour) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.round(canvas.clientWidth * dpr);
  const h = Math.round(canvas.clientHeight * dpr);
  if (canvas.width !== w || canvas.height !== h) Object.assign(canvas, { width: w, height: h });
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, w, h);
  g.strokeStyle = "rgba(255,255,255,0.08)";
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(0, h / 2);
  g.lineTo(w, h / 2);
  g.stroke();
  if (!analyser) return;
  const data = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(data);
  g.strokeStyle = colour;
  g.lineWidth = 2 * dpr;
  g.beginPath();
  for (let i = 0; i < data.length; i++) {
    const x = (i / (data.length - 1)) * w;
    const y = h / 2 - data[i] * (h / 2) * 0.9;
    if (i === 0) g.moveTo(x, y);
    else g.lineTo(x, y);
  }
  g.stroke();
}

function ms(v) {
  return v === null || v === undefined ? "–" : `${Math.round(v)} ms`;
}

function drawLatency() {
  const io = audio ? FRAME_MS + ((audio.ctx.baseLatency || 0) + (audio.ctx.outputLatency || 0)) * 1000 : null;
  ui.lat.shifter.textContent = ms(lat.shifterMs);
  ui.lat.network.textContent = ms(lat.rttMs);
  ui.lat.buffer.textContent = ms(streaming ? lat.bufferMs : null);
  ui.lat.io.textContent = ms(streaming ? io : null);
  const parts = [lat.shifterMs, lat.rttMs, lat.bufferMs, io];
  ui.lat.total.textContent = streaming && parts.every((p) => p !== null) ? ms(parts.reduce((a, b) => a + b, 0)) : "–";
}

function drawBoot() {
  if (!boot) return;
  const now = performance.now();
  const span = boot.deadline - boot.start;
  const frac = span <= 0 ? 1 : Math.min(1, (now - boot.start) / span);
  const left = Math.ceil((boot.deadline - now) / 1000);
  ui.bootFill.style.width = `${(frac * 100).toFixed(1)}%`;
  ui.bootLeft.textContent = left > 0 ? `about ${left} s left` : "almost ready…";
}

let lastReadout = 0;
function draw(now) {
  drawScope(ui.scopeIn, audio && audio.inAnalyser, "#a78bfa");
  drawScope(ui.scopeOut, audio && audio.outAnalyser, "#22d3ee");
  drawBoot();
  if (now - lastReadout > 200) { // text read-out 5x per second is plenty
    lastReadout = now;
    drawLatency();
  }
  requestAnimationFrame(draw);
}

// ---- wiring -----------------------------------------------------------------------------------

ui.uid.textContent = uid;
ui.start.addEventListener("click", () => start(false));
ui.stop.addEventListener("click", stop);
ui.takeover.addEventListener("click", () => start(true));
loadModels();
loadRegions();
refreshUsage();
requestAnimationFrame(draw);
