// Voice changer page: microphone -> node (pitch-shifting worker) -> speakers.
// Flow: Start -> open audio (one AudioContext, two worklets) -> lobby socket
// (queued / booting / ready) -> node socket with the ticket -> stream 10 ms frames.
// Protocol: see docs/protocol.md. ES modules, no build step:
//   state.js   the one state object and the tunables
//   ui.js      elements, status, buttons, boot bar, scopes, latency read-out
//   api.js     identity (the server's) and the JSON API (voices, regions, minutes used)
//   beacons.js each region's round trip, measured (the lobby places by it)
//   audio.js   the audio graph (capture and playback worklets)
//   lobby.js   the lobby socket;  node.js  the node socket, frames and resuming
//   latency.js every term of the mouth-to-ear latency, measured
//   session.js Start / Stop / failure
import { state } from "./state.js";
import { loadIdentity, loadModels, loadRegions, refreshUsage } from "./api.js";
import { start, stop } from "./session.js";
import { draw, ui } from "./ui.js";

loadIdentity();
ui.start.addEventListener("click", () => start(false));
ui.stop.addEventListener("click", stop);
ui.takeover.addEventListener("click", () => start(true));
loadModels();
loadRegions();
refreshUsage();
requestAnimationFrame(draw);
