// The page's elements: status line, buttons, boot progress, scopes and the latency
// read-out. Drawing runs on requestAnimationFrame: scopes 30 times a second, text 5.
import { state } from "./state.js";
import { terms } from "./latency.js";

const $ = (id) => document.getElementById(id);
export const ui = {
  model: $("model"), region: $("region"), start: $("start"), stop: $("stop"),
  status: $("status"), boot: $("boot"), bootFill: $("boot-fill"), bootLeft: $("boot-left"),
  takeover: $("takeover"), usage: $("usage"), uid: $("uid"),
  scopeIn: $("scope-in"), scopeOut: $("scope-out"),
  lat: Object.fromEntries(["capture", "network", "model", "buffer", "output", "total"]
    .map((k) => [k, $(`lat-${k}`)])),
};

// kind: "busy" | "ok" | "error" | "idle" (colour); state goes on <body data-state>.
export function setStatus(text, kind, pageState) {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
  document.body.dataset.state = pageState;
}

export function setButtons() {
  ui.start.disabled = state.active || !state.modelsLoaded;
  ui.stop.disabled = !state.active;
  ui.model.disabled = state.active || !state.modelsLoaded;
  ui.region.disabled = state.active;
}

// Boot progress: the bar fills toward the latest ETA and is animated in draw().
export function showBoot(etaS) {
  const now = performance.now();
  if (!state.boot) state.boot = { start: now };
  state.boot.deadline = now + Math.max(0, etaS) * 1000;
  ui.boot.hidden = false;
}

export function hideBoot() {
  state.boot = null;
  ui.boot.hidden = true;
  ui.bootFill.style.width = "0";
  ui.bootLeft.textContent = "";
}

function drawBoot() {
  const boot = state.boot;
  if (!boot) return;
  const now = performance.now();
  const span = boot.deadline - boot.start;
  const frac = span <= 0 ? 1 : Math.min(1, (now - boot.start) / span);
  const left = Math.ceil((boot.deadline - now) / 1000);
  ui.bootFill.style.width = `${(frac * 100).toFixed(1)}%`;
  ui.bootLeft.textContent = left > 0 ? `about ${left} s left` : "almost ready…";
}

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

const ms = (v) => (v === null || v === undefined ? "–" : `${v} ms`);

function drawLatency() {
  const t = terms() || {};
  for (const k of Object.keys(ui.lat)) ui.lat[k].textContent = ms(t[k]);
}

let lastReadout = 0;
let lastScope = 0;
export function draw(now) {
  const a = state.audio;
  if (now - lastScope > 33) { // scopes at 30 fps: the main thread also carries the audio
    lastScope = now;
    drawScope(ui.scopeIn, a && a.inAnalyser, "#a78bfa");
    drawScope(ui.scopeOut, a && a.outAnalyser, "#22d3ee");
  }
  drawBoot();
  if (now - lastReadout > 200) { // text read-out 5x per second is plenty
    lastReadout = now;
    drawLatency();
  }
  requestAnimationFrame(draw);
}
