// Playback processor: a small jitter buffer in front of the speakers.
// Receives ArrayBuffers of mono int16 LE PCM via port.postMessage ("reset" empties it).
// - Starts (and restarts after an underrun) once targetMs of audio is buffered.
// - On underrun outputs silence rather than stalling.
// - Above maxMs it drops the oldest samples back down to targetMs, so latency
//   can never grow without bound when the network delivers bursts.
// Every ~100 ms it posts {bufferedMs, underruns, dropped} for the latency read-out.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.target = Math.round((sampleRate * o.targetMs) / 1000);
    this.cap = Math.round((sampleRate * o.maxMs) / 1000);
    this.ring = new Float32Array(sampleRate); // 1 s: far above cap + one frame
    this.read = 0;
    this.size = 0;
    this.playing = false;
    this.underruns = 0;
    this.dropped = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => this.push(e.data);
  }

  push(data) {
    if (data === "reset") {
      this.size = 0;
      this.playing = false;
      return;
    }
    const view = new DataView(data);
    const n = data.byteLength >> 1;
    const len = this.ring.length;
    for (let i = 0; i < n; i++) {
      if (this.size === len) this.skip(1);
      this.ring[(this.read + this.size) % len] = view.getInt16(i * 2, true) / 32768;
      this.size++;
    }
    if (this.size > this.cap) this.skip(this.size - this.target);
  }

  skip(n) {
    this.read = (this.read + n) % this.ring.length;
    this.size -= n;
    this.dropped += n;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.size >= this.target) this.playing = true;
    let i = 0;
    if (this.playing) {
      const len = this.ring.length;
      for (; i < out.length && this.size > 0; i++) {
        out[i] = this.ring[this.read];
        this.read = (this.read + 1) % len;
        this.size--;
      }
      if (i < out.length) {
        this.playing = false;
        this.underruns++;
      }
    }
    out.fill(0, i);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({
        bufferedMs: (this.size * 1000) / sampleRate,
        underruns: this.underruns,
        dropped: this.dropped,
      });
    }
    return true;
  }
}

registerProcessor("playback", PlaybackProcessor);
