// Voice changer page: Start -> audio (one AudioContext, two worklets) -> lobby socket
// (queued / booting / ready) -> node socket with the ticket -> 10 ms frames both ways
// (docs/protocol.md). ES modules, no build step; state.js holds what the page knows.
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
