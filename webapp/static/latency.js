// Mouth-to-ear latency, every term measured on this page while it streams, each a mean
// over about the last 100 ms:
//   capture = the track's input latency (the browser's) + the mean wait of a sample in the
//             capture worklet's frame + the hop from the audio thread to the socket
//   network = each frame's round trip through the node, matched by position (output sample
//             k answers input sample k), from send() to the answer's message event
//   model   = the node's latency_ms ("started"); buffer = the jitter buffer's mean depth
//   output  = AudioContext.baseLatency + outputLatency (the browser's)
// Buffers count by their mean waits (Little's law), so a frame's length is counted once:
// half in the capture buffer, half in the playback buffer. The total shown is the sum of
// the terms as shown (each rounded to 1 ms).
import { state } from "./state.js";

const SMOOTH = 0.1; // exponential smoothing of per-frame samples

export function resetLatency(modelMs = null) {
  state.latency = {
    modelMs,
    rttMs: null,
    hopMs: null,
    bufferMs: null,
    fillMs: null,
    underruns: 0,
    rttSamples: [], // the last few hundred raw round trips (for tests and curiosity)
    sent: 0, // samples sent since "started"
    received: 0, // samples received since "started"
    pending: [], // {end, t}: the send time of the frame ending at sample `end`
  };
}

function smooth(old, x) {
  return old === null ? x : old * (1 - SMOOTH) + x * SMOOTH;
}

// A frame left for the node: `frameEnd` is the context time of its last sample.
export function frameSent(samples, frameEnd, meanFillMs, ctx) {
  const l = state.latency;
  if (!l) return;
  l.sent += samples;
  l.pending.push({ end: l.sent, t: performance.now() });
  l.fillMs = smooth(l.fillMs, meanFillMs);
  l.hopMs = smooth(l.hopMs, Math.max(0, 1000 * (ctx.currentTime - frameEnd)));
}

// An answer arrived at `at` (the message event's time stamp, performance.now() clock).
export function answerReceived(samples, at) {
  const l = state.latency;
  if (!l) return;
  l.received += samples;
  let sentAt = null;
  while (l.pending.length && l.pending[0].end <= l.received) sentAt = l.pending.shift().t;
  if (sentAt === null) return;
  const ms = at - sentAt;
  l.rttMs = smooth(l.rttMs, ms);
  l.rttSamples.push(ms);
  if (l.rttSamples.length > 500) l.rttSamples.shift();
}

export function playbackReport(report) {
  state.playback = report;
  if (!state.latency) return;
  state.latency.bufferMs = report.meanBufferedMs;
  state.latency.underruns = report.underruns;
}

// The terms as shown (whole ms) and their sum; null terms mean "not measured yet".
export function terms() {
  const a = state.audio;
  const l = state.latency;
  if (!a || !l || !state.streaming) return null;
  const capture = l.fillMs === null || l.hopMs === null ? null
    : 1000 * a.inputLatencyS + l.fillMs + l.hopMs;
  const output = 1000 * ((a.ctx.baseLatency || 0) + (a.ctx.outputLatency || 0));
  const shown = {
    capture, network: l.rttMs, model: l.modelMs, buffer: l.bufferMs, output,
  };
  for (const k of Object.keys(shown)) shown[k] = shown[k] === null ? null : Math.round(shown[k]);
  const parts = Object.values(shown);
  shown.total = parts.every((p) => p !== null) ? parts.reduce((s, p) => s + p, 0) : null;
  return shown;
}
