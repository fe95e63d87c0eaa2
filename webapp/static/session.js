// Start, stop and failure: what the buttons do and how everything goes back to idle.
import { state } from "./state.js";
import { refreshUsage } from "./api.js";
import { closeAudio, micMessage, openAudio } from "./audio.js";
import { closeLobby, openLobby } from "./lobby.js";
import { closeNode, onPlayback, sendFrame } from "./node.js";
import { hideBoot, setButtons, setStatus, ui } from "./ui.js";

export async function start(takeover = false) {
  if (state.active) return;
  const mine = ++state.attempt;
  state.active = true;
  state.retries = 0;
  state.lobbyRetries = 0;
  state.startedAt = 0;
  state.session = { id: null, region: null, nodeId: null };
  ui.takeover.hidden = true;
  setButtons();
  setStatus("Asking for the microphone…", "busy", "connecting");
  let opened;
  try {
    opened = await openAudio(sendFrame, onPlayback);
  } catch (err) {
    if (mine === state.attempt && state.active) fail(micMessage(err));
    return;
  }
  if (mine !== state.attempt || !state.active) return closeAudio(opened); // Stop pressed meanwhile
  state.audio = opened;
  await state.nodeClosing; // let a just-stopped stream release the single-stream lock
  await state.rttsReady; // the regions' beacons, measured within a second of page load
  if (mine === state.attempt && state.active) openLobby({ takeover }, { fail });
}

export function stop() {
  teardown();
  setStatus("Stopped.", "idle", "stopped");
}

// Show an error and put everything back to idle.
export function fail(message) {
  teardown();
  setStatus(message, "error", "error");
}

function teardown() {
  state.active = false;
  state.streaming = false;
  clearTimeout(state.retryTimer);
  hideBoot();
  closeLobby();
  closeNode(true);
  closeAudio(state.audio);
  state.audio = null;
  state.latency = null;
  setButtons();
  refreshUsage();
}
