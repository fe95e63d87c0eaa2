// The node socket ({node_url}?ticket=T): start -> started -> PCM frames both ways ->
// stop; losing the node resumes the session through the lobby, with backoff.
// A planned move (the node sends "move": its version is being replaced, its users are
// gathered onto fewer nodes, or the user's nearest region serves again) is
// make-before-break: the page resumes through the lobby while the old stream plays on,
// streams the microphone to both nodes, crossfades playback once the new node answers,
// then stops the old stream.
import { config, state } from "./state.js";
import { parseMessage } from "./api.js";
import { answerReceived, frameSent, playbackReport, resetLatency } from "./latency.js";
import { setStatus, ui } from "./ui.js";

// `flow` is what the session gives the node socket to go on with: {fail(message),
// openLobby(opts)} (the session owns the lobby; this module imports neither).
export function connectNode(m, flow) {
  const moving = state.moveFrom !== null && state.moveFrom.readyState === WebSocket.OPEN;
  if (moving) {
    const extra = state.node; // a second "ready" during the move: drop the first new one
    if (extra && extra !== state.moveFrom) leave(extra);
  } else {
    closeNode(false); // a new "ready" while streaming means: switch nodes
  }
  state.session.region = m.region;
  state.session.nodeId = m.node_id;
  state.lastNodeError = "";
  const ws = new WebSocket(`${m.node_url}?ticket=${encodeURIComponent(m.ticket)}`);
  ws.binaryType = "arraybuffer";
  ws.nodeId = m.node_id;
  ws.flow = flow;
  ws.started = false; // answered "started": frames may go to it
  state.node = ws;
  if (moving) {
    setStatus(`${ui.status.textContent.replace(/ \(moving.*$/, "")} (moving to node ${m.node_id} in ${m.region}…)`, "ok", "streaming");
  } else {
    setStatus(`Connecting to node ${m.node_id} in ${m.region}…`, "busy", "connecting");
  }
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", sample_rate: state.audio.ctx.sampleRate }));
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return onNodeAudio(ws, e.data);
    const msg = parseMessage(e.data);
    if (!msg) return;
    if (msg.type === "started") onStarted(ws, msg);
    else if (msg.type === "move") onMove(ws, msg);
    else if (msg.type === "error") state.lastNodeError = msg.message || msg.code || "";
  };
  ws.onclose = (e) => onNodeClose(ws, e.code);
}

function onStarted(ws, m) {
  ws.started = true;
  ws.lastAnswer = performance.now();
  state.streaming = true;
  state.startedAt = performance.now();
  resetLatency(m.latency_ms);
  const moving = state.moveFrom !== null;
  // During a move the old stream keeps playing: the new one fills a second buffer.
  const warmUp = Math.round(((m.latency_ms || 0) * state.audio.ctx.sampleRate) / 1000);
  state.audio.playback.port.postMessage(moving ? { nextSkip: warmUp } : "reset");
  const what = moving ? "Moving to" : "Streaming";
  setStatus(`${what} ${m.model || ui.model.value} on node ${state.session.nodeId} in ${state.session.region}.`, "ok", "streaming");
}

// The node asks to move (see the top): get the new stream first.
function onMove(ws, m) {
  if (ws !== state.node || state.moveFrom !== null || !state.active) return;
  console.info(`node ${ws.nodeId} asks to move (${m.reason}); closing in ${m.close_in_ms} ms`);
  if (!config.MAKE_BEFORE_BREAK) return; // wait for the close, then resume
  state.moveFrom = ws;
  state.moveReason = m.reason;
  state.moveStart = performance.now();
  state.moveNoticeAt = state.audio.ctx.currentTime;
  setStatus(`${ui.status.textContent} (moving: ${m.message || "the node is draining"})`, "ok", "streaming");
  ws.flow.openLobby({ resume: state.session.id, moving: true });
}

// The playback worklet's report, or its word that a move's crossfade is over.
export function onPlayback(report) {
  if (report && report.switched) finishMove(report.at);
  else playbackReport(report);
}

function finishMove(at) {
  const old = state.moveFrom;
  state.moveFrom = null;
  if (!old) return;
  // noticeAt, at: context times of the node's "move" and of the end of the crossfade
  state.moves.push({ from: old.nodeId, to: state.node && state.node.nodeId,
    ms: performance.now() - state.moveStart, noticeAt: state.moveNoticeAt, at });
  stopSocket(old);
  if (state.node && state.node.started) {
    setStatus(`Streaming ${ui.model.value} on node ${state.session.nodeId} in ${state.session.region} (moved from ${old.nodeId}).`, "ok", "streaming");
  }
}

// A captured frame from the capture worklet; `frameEnd` is its last sample's context
// time, `meanFillMs` how long its samples waited in the worklet on average. During a
// move it goes to both nodes.
export function sendFrame(buf, frameEnd, meanFillMs) {
  if (!state.streaming) return;
  const old = state.moveFrom;
  if (old && old !== state.node && canSend(old)) old.send(buf);
  const ws = state.node;
  if (!ws || !canSend(ws)) return;
  ws.send(buf);
  frameSent(buf.byteLength >> 1, frameEnd, meanFillMs, state.audio.ctx);
  if (state.moveFrom === null && performance.now() - ws.lastAnswer > config.STALL_MS) stalled(ws);
}

// The node stopped answering though its socket is open (its model call hung): leave it
// and resume elsewhere now; the control plane drains it once its heartbeat shows the hang.
function stalled(ws) {
  console.warn(`node ${ws.nodeId} gave no audio for ${config.STALL_MS} ms: moving on`);
  leave(ws);
  state.node = null;
  state.streaming = false;
  nodeLost(ws.flow, "no audio from the node", "The voice node stopped answering");
}

// Open, started, and not congested (drop, never queue).
function canSend(ws) {
  return ws.started && ws.readyState === WebSocket.OPEN && ws.bufferedAmount <= config.MAX_UNSENT_BYTES;
}

function onNodeAudio(ws, buf) {
  if (!state.audio || (ws !== state.node && ws !== state.moveFrom)) return; // a socket we left
  ws.lastAnswer = performance.now();
  const port = state.audio.playback.port;
  if (ws !== state.node) return port.postMessage(buf, [buf]); // a move's old stream
  answerReceived(buf.byteLength >> 1, performance.now());
  // During a move the new node's answers fill the playback worklet's second buffer.
  const moving = state.moveFrom !== null && state.moveFrom !== ws;
  port.postMessage(moving ? { next: buf } : buf, [buf]);
}

function onNodeClose(ws, code) {
  if (ws === state.moveFrom && ws !== state.node) {
    state.moveFrom = null; // the old node closed first (its deadline): the new one plays
    if (state.audio) state.audio.playback.port.postMessage("next-now");
    return;
  }
  if (state.node !== ws) return; // an old node we left on purpose
  console.info(`node socket closed with code ${code}`);
  if (ws === state.moveFrom && state.lobby) {
    // Closed before the new node was ready: the move's lobby is still on it.
    state.moveFrom = state.node = null;
    state.streaming = false;
    setStatus("Moving to a new node…", "busy", "reconnecting");
    return;
  }
  const old = state.moveFrom;
  if (old && old !== ws && old.readyState === WebSocket.OPEN) {
    // The move's new stream failed: keep playing the old one (its node closes it at its
    // deadline, and the page then resumes as after any lost node).
    state.moveFrom = null;
    state.node = old;
    state.session.nodeId = old.nodeId;
    state.streaming = true;
    state.audio.playback.port.postMessage("drop-next");
    return;
  }
  state.node = state.moveFrom = null;
  state.streaming = false;
  if (!state.active) return;
  const fatal = { // the closes that end the session; any other resumes it
    4409: "Taken over: you started streaming somewhere else (another tab or device), so this stream stopped.",
    4401: "The voice node refused the session ticket (expired or invalid). Press Start to try again.",
    4400: `The voice node rejected our audio: ${state.lastNodeError || "malformed message"}. Press Start to try again.`,
  }[code];
  if (fatal) ws.flow.fail(fatal);
  else nodeLost(ws.flow, `close code ${code}`); // 1011 model failed, 4503 full/draining, 1006 dropped, ...
}

// Resume the same session through the lobby, with backoff, a few times.
// `what` starts the status line ("Node lost, reconnecting…").
export function nodeLost(flow, why, what = "Node lost") {
  // Reset only after a stable stretch, so a crash loop (or two tabs fighting over
  // one user's stream) still ends after MAX_RETRIES.
  if (state.startedAt && performance.now() - state.startedAt > config.STABLE_MS) state.retries = 0;
  state.startedAt = 0;
  if (state.retries >= config.MAX_RETRIES) {
    const detail = state.lastNodeError ? `: ${state.lastNodeError}` : ` (${why})`;
    flow.fail(`${what} and ${config.MAX_RETRIES} reconnects failed${detail}. Press Start to try again.`);
    return;
  }
  state.retries++;
  setStatus(`${what}, reconnecting… (attempt ${state.retries} of ${config.MAX_RETRIES})`, "busy", "reconnecting");
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(() => flow.openLobby({ resume: state.session.id }),
    config.RETRY_BASE_MS * 2 ** (state.retries - 1));
}

// Ask a node to flush and close (1000); force-close after 1 s. Resolves once closed.
function stopSocket(ws) {
  if (ws.readyState !== WebSocket.OPEN) {
    leave(ws);
    return Promise.resolve();
  }
  ws.onopen = ws.onmessage = null;
  ws.send(JSON.stringify({ type: "stop" }));
  return new Promise((resolve) => {
    ws.onclose = resolve;
    setTimeout(() => { ws.close(1000); resolve(); }, 1000);
  });
}

// Close a socket at once, hearing nothing more from it.
function leave(ws) {
  ws.onopen = ws.onmessage = ws.onclose = null;
  ws.close(1000);
}

// sendStop: let the node flush (stopSocket) rather than close at once. A move's old
// stream, if any, is stopped too.
export function closeNode(sendStop) {
  const old = state.moveFrom;
  state.moveFrom = null;
  if (old && old !== state.node) stopSocket(old);
  const ws = state.node;
  state.node = null;
  if (!ws) return;
  if (sendStop) state.nodeClosing = stopSocket(ws);
  else leave(ws);
}
