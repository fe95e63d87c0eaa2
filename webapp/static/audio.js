// The audio graph: one AudioContext, the microphone, a capture worklet that posts
// frames and a playback worklet (jitter buffer) in front of the speakers.
import { config } from "./state.js";

// onFrame(buf, frameEnd, meanFillMs): a captured frame (see capture-worklet.js).
// onReport(report): the playback worklet's report, or {switched: true} (playback-worklet.js).
export async function openAudio(onFrame, onReport) {
  // Created inside the click, so autoplay rules allow it to run. latencyHint 0: the
  // smallest output buffer the device allows ("interactive" adds tens of ms).
  const ctx = new AudioContext({ latencyHint: 0 });
  let stream = null;
  try {
    if (!navigator.mediaDevices) throw new DOMException("no mediaDevices", "SecurityError");
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false,
        channelCount: 1, latency: 0 },
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
  const frameSamples = Math.round((ctx.sampleRate * config.FRAME_MS) / 1000);
  const source = ctx.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(ctx, "capture", { processorOptions: { frameSamples } });
  const playback = new AudioWorkletNode(ctx, "playback", {
    numberOfInputs: 0, outputChannelCount: [1],
    processorOptions: { targetMs: config.JITTER_TARGET_MS, maxMs: config.JITTER_MAX_MS,
      floorMs: config.JITTER_FLOOR_MS, fadeMs: config.FADE_MS },
  });
  // 512 samples (~11 ms) per scope trace: the drawing stays cheap on the main thread,
  // which also carries every frame to and from the node.
  const inAnalyser = new AnalyserNode(ctx, { fftSize: 512 });
  const outAnalyser = new AnalyserNode(ctx, { fftSize: 512 });
  source.connect(inAnalyser);
  source.connect(capture);
  capture.connect(ctx.destination); // silent output; keeps the capture node pulled
  playback.connect(outAnalyser);
  outAnalyser.connect(ctx.destination);
  capture.port.onmessage = (e) => onFrame(e.data.buf, e.data.end, e.data.meanFillMs);
  playback.port.onmessage = (e) => onReport(e.data);
  // The device's input latency as the browser reports it (0 where it does not).
  const settings = stream.getAudioTracks()[0].getSettings();
  const inputLatencyS = typeof settings.latency === "number" ? settings.latency : 0;
  return { ctx, stream, capture, playback, inAnalyser, outAnalyser, inputLatencyS };
}

export function closeAudio(a) {
  if (!a) return;
  a.stream.getTracks().forEach((t) => t.stop());
  a.capture.port.onmessage = a.playback.port.onmessage = null;
  a.ctx.close();
}

export function micMessage(err) {
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
