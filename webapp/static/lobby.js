// The lobby socket (/ws/session): queued -> booting -> ready, or an error.
import { state } from "./state.js";
import { rttParam } from "./beacons.js";
import { parseMessage, userToken } from "./api.js";
import { connectNode, nodeLost } from "./node.js";
import { hideBoot, setStatus, showBoot, ui } from "./ui.js";

function lobbyUrl({ takeover, resume }) {
  // Who the user is: the uid cookie (sent with the socket), or the page's ?token=.
  const q = new URLSearchParams({ model: ui.model.value });
  if (userToken) q.set("token", userToken);
  if (ui.region.value) q.set("region", ui.region.value);
  else {
    // No geolocation prompt: the time zone offset gives a rough longitude (15 deg/hour).
    q.set("lat", 40);
    q.set("lon", Math.max(-180, Math.min(180, -new Date().getTimezoneOffset() / 4)));
    if (rttParam()) q.set("rtt", rttParam()); // measured: placement prefers it
  }
  if (resume) q.set("resume", resume);
  if (takeover) q.set("takeover", "1");
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/ws/session?${q}`;
}

// `flow` is the session's {fail(message)}: what to do when the lobby cannot go on.
export function openLobby(opts, flow) {
  closeLobby();
  const next = { fail: flow.fail, openLobby: (o) => openLobby(o, flow) }; // for the node
  const ws = new WebSocket(lobbyUrl(opts));
  let opened = false;
  let settled = false; // the server sent "ready" or an error: closing afterwards is normal
  state.lobby = ws;
  if (!opts.resume) setStatus("Connecting to the server…", "busy", "connecting");
  ws.onopen = () => { opened = true; };
  ws.onmessage = (e) => {
    const m = parseMessage(e.data);
    if (!m) return;
    if (m.type === "error" || m.type === "ready") settled = true;
    if (state.lobby !== ws) return;
    if (m.type === "error" && m.code === "unavailable") {
      retryLater(opts, flow, "The server is briefly unavailable");
      return;
    }
    onLobbyMessage(m, next);
  };
  ws.onclose = () => {
    if (state.lobby !== ws) return; // replaced or closed on purpose
    state.lobby = null;
    if (!state.active || settled) return; // after "ready" the node socket handles loss
    if (opts.resume || state.session.id) {
      // We hold a session (queued, booting or resuming): rejoin it, a few times.
      const why = opened ? "the server closed the lobby" : "the server is unreachable";
      nodeLost(next, why, "Connection to the server lost");
    } else if (!opened) {
      retryLater(opts, flow, `Cannot reach the server at ${location.host}`);
    } else {
      flow.fail("The server closed the connection before a voice node was ready. Press Start to retry.");
    }
  };
}

// The server unreachable or its state store briefly away: try again, 1, 2, 4 ... 15 s apart,
// telling the user, and give up after RETRIES (then Start tries again).
const RETRIES = 8;

function retryLater(opts, flow, why) {
  state.lobbyRetries += 1;
  if (state.lobbyRetries > RETRIES) {
    flow.fail(`${why}. Press Start to try again.`);
    return;
  }
  const delayS = Math.min(15, 2 ** (state.lobbyRetries - 1));
  setStatus(`${why}; trying again in ${delayS} s (attempt ${state.lobbyRetries} of ${RETRIES})…`,
    "busy", "connecting");
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(() => { if (state.active) openLobby(opts, flow); },
    delayS * 1000);
}

export function closeLobby() {
  const ws = state.lobby;
  state.lobby = null;
  if (ws) ws.close(1000);
}

// What the server says about regions (an outage, a provider out of capacity).
const note = (m) => (m.note ? ` (${m.note})` : "");

function onLobbyMessage(m, next) {
  if (m.session_id) state.session.id = m.session_id;
  if (m.type !== "error") state.lobbyRetries = 0; // the server answers again
  switch (m.type) {
    case "queued":
    case "booting":
      if (state.moveFrom) { // still playing on the old node: say so, keep streaming
        const which = state.moveReason === "recall" ? "a node nearer you" : "another node";
        setStatus(`Streaming on node ${state.moveFrom.nodeId} while ${which} ${m.type === "queued" ? "frees up" : "starts"} in ${m.region}…`, "ok", "streaming");
        break;
      }
      if (m.type === "booting") {
        showBoot(m.eta_s);
        setStatus(`Starting a voice node for you in ${m.region}…${note(m)}`, "busy", "booting");
        break;
      }
      hideBoot();
      setStatus(`Queued: #${m.position} in line for ${ui.model.value} in ${m.region}. Waiting for a free slot…${note(m)}`, "busy", "queued");
      break;
    case "ready":
      clearTimeout(state.retryTimer);
      hideBoot();
      connectNode(m, next);
      break;
    case "error":
      next.fail(m.message || `The server refused: ${m.code}`);
      if (m.code === "already_streaming") ui.takeover.hidden = false;
      break;
    default:
      break; // newer server events: ignore
  }
}
