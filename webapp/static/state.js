// The page's one state object. Every module reads and writes this object and nothing
// else module-wide, so what the page knows at any moment is in one place (and visible
// to tests as window.voiceState).

export const config = {
  FRAME_MS: 10, // capture frame sent to the node (protocol: 10-100 ms); 10 ms halves capture buffering
  JITTER_TARGET_MS: 20, // playback (re)starts once this much audio is buffered
  JITTER_MAX_MS: 60, // above this the playback worklet drops the oldest audio back to the target
  JITTER_FLOOR_MS: 8, // a buffer that never fell below this for 100 ms is trimmed down to it
  // Node losses in a row before giving up. Backoff 1, 2, 4, 8 s: the later tries come
  // after the control plane's heartbeat timeout (6 s), when it no longer offers a dead node.
  MAX_RETRIES: 4,
  RETRY_BASE_MS: 1000,
  STABLE_MS: 10000, // streaming this long on a node resets the retry count
  MAX_UNSENT_BYTES: 96000, // ~1 s at 48 kHz: skip frames rather than queue latency
  // A planned move (the node says "move"): open the new stream first, crossfade over
  // FADE_MS once it answers, then stop the old one. Off: wait for the old node to close
  // the stream, then resume (a gap of a second or more; tests use it as the baseline).
  MAKE_BEFORE_BREAK: true,
  FADE_MS: 30,
  // No answer from the node for this long while we send: its model is stalled (a hung GPU
  // call leaves its socket and heartbeats alive), so resume elsewhere at once.
  STALL_MS: 1500,
};

export const state = {
  modelsLoaded: false,
  active: false, // the user wants to stream: between Start and Stop or a fatal error
  attempt: 0, // bumps on every Start, so a stale Start (Stop pressed meanwhile) gives up
  audio: null, // {ctx, stream, capture, playback, inAnalyser, outAnalyser, inputLatencyS}
  lobby: null, // current lobby WebSocket
  node: null, // current node WebSocket
  moveFrom: null, // during a planned move: the old node's WebSocket, still playing
  moveReason: "", // why it moves: "drain" (a new version, consolidation) or "recall" (the nearest region is back)
  moveStart: 0, // performance.now() of the move's notice
  moveNoticeAt: 0, // the same in context time
  moves: [], // planned moves done: {from, to, ms, noticeAt, at} (see node.js finishMove)
  playback: null, // the playback worklet's last report (buffer, underruns, longest gap)
  nodeClosing: Promise.resolve(), // resolves once a stopped node socket has closed
  streaming: false, // node answered "started"
  session: { id: null, region: null, nodeId: null },
  retries: 0,
  lobbyRetries: 0, // lobby attempts in a row the server could not take (lobby.js retryLater)
  retryTimer: null,
  startedAt: 0, // performance.now() of the last "started"
  boot: null, // {start, deadline} in performance.now() ms while a node boots
  lastNodeError: "",
  // Measured latency terms (ms), null until measured; see latency.js.
  latency: null,
  rtts: {}, // region -> round trip (ms) to its beacon, as measured (beacons.js)
  rttsReady: Promise.resolve(), // settles once the beacons are measured (within 1 s)
};

window.voiceState = state;
window.voiceConfig = config;
