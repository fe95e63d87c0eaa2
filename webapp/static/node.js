// The node socket ({node_url}?ticket=T): start -> started -> PCM frames both ways ->
// stop; losing the node resumes the session through the lobby, with backoff.
import { config, state } from "./state.js";
import { answerReceived, frameSent, resetLatency } from "./latency.js";
import { openLobby } from "./lobby.js";
import { fail } from "./session.js";
import { setStatus, ui } from "./ui.js";

export function connectNode(m) {
  closeNode(false); // a new "ready" while streaming means: switch nodes
  state.session.region = m.region;
  state.session.nodeId = m.node_id;
  state.lastNodeError = "";
  const ws = new WebSocket(`${m.node_url}?ticket=${encodeURIComponent(m.ticket)}`);
  ws.binaryType = "arraybuffer";
  state.node = ws;
  setStatus(`Connecting to node ${m.node_id} in ${m.region}…`, "busy", "connecting");
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", sample_rate: state.audio.ctx.sampleRate }));
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return onNodeAudio(e.data);
    const msg = JSON.parse(e.data);
    if (msg.type === "started") onStarted(msg);
    else if (msg.type === "error") state.lastNodeError = msg.message || msg.code || "";
  };
  ws.onclose = (e) => onNodeClose(ws, e.code);
}

function onStarted(m) {
  state.streaming = true;
  state.startedAt = performance.now();
  resetLatency(m.latency_ms);
  state.audio.playback.port.postMessage("reset");
  setStatus(`Streaming ${m.model || ui.model.value} on node ${state.session.nodeId} in ${state.session.region}.`, "ok", "streaming");
}

// A captured frame from the capture worklet; `frameEnd` is its last sample's context
// time, `meanFillMs` how long its samples waited in the worklet on average.
export function sendFrame(buf, frameEnd, meanFillMs) {
  const ws = state.node;
  if (!state.streaming || !ws || ws.readyState !== WebSocket.OPEN) return;
  if (ws.bufferedAmount > config.MAX_UNSENT_BYTES) return; // congested: drop, never queue
  ws.send(buf);
  frameSent(buf.byteLength >> 1, frameEnd, meanFillMs, state.audio.ctx);
}

function onNodeAudio(buf) {
  if (!state.audio) return;
  answerReceived(buf.byteLength >> 1, performance.now());
  state.audio.playback.port.postMessage(buf, [buf]);
}

function onNodeClose(ws, code) {
  if (state.node !== ws) return; // an old node we left on purpose
  console.info(`node socket closed with code ${code}`);
  state.node = null;
  state.streaming = false;
  if (!state.active) return;
  if (code === 4409) {
    fail("Taken over: you started streaming somewhere else (another tab or device), so this stream stopped.");
  } else if (code === 4401) {
    fail("The voice node refused the session ticket (expired or invalid). Press Start to try again.");
  } else if (code === 4400) {
    fail(`The voice node rejected our audio: ${state.lastNodeError || "malformed message"}. Press Start to try again.`);
  } else {
    nodeLost(`close code ${code}`); // 1011 model failed, 4503 full/draining, 1006 dropped, ...
  }
}

// Resume the same session through the lobby, with backoff, a few times.
// `what` starts the status line ("Node lost, reconnecting…").
export function nodeLost(why, what = "Node lost") {
  // Reset only after a stable stretch, so a crash loop (or two tabs fighting over
  // one user's stream) still ends after MAX_RETRIES.
  if (state.startedAt && performance.now() - state.startedAt > config.STABLE_MS) state.retries = 0;
  state.startedAt = 0;
  if (state.retries >= config.MAX_RETRIES) {
    const detail = state.lastNodeError ? `: ${state.lastNodeError}` : ` (${why})`;
    fail(`${what} and ${config.MAX_RETRIES} reconnects failed${detail}. Press Start to try again.`);
    return;
  }
  state.retries++;
  setStatus(`${what}, reconnecting… (attempt ${state.retries} of ${config.MAX_RETRIES})`, "busy", "reconnecting");
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(() => openLobby({ resume: state.session.id }),
    config.RETRY_BASE_MS * 2 ** (state.retries - 1));
}

// sendStop: ask the node to flush and close (1000); force-close after 1 s.
export function closeNode(sendStop) {
  const ws = state.node;
  state.node = null;
  if (!ws) return;
  ws.onopen = ws.onmessage = null;
  if (sendStop && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: "stop" }));
    state.nodeClosing = new Promise((resolve) => {
      ws.onclose = resolve;
      setTimeout(() => { ws.close(1000); resolve(); }, 1000);
    });
  } else {
    ws.onclose = null;
    ws.close(1000);
  }
}
