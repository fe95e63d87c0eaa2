// Playback processor: a small jitter buffer in front of the speakers.
// Receives ArrayBuffers of mono int16 LE PCM via port.postMessage ("reset" empties it).
// - Starts (and restarts after an underrun) once targetMs of audio is buffered.
// - On underrun outputs silence rather than stalling.
// - Above maxMs it drops the oldest samples back down to targetMs, so latency
//   can never grow without bound when the network delivers bursts.
// - Audio that arrives in a burst after a stall would otherwise stay queued for good
//   (frames come in as fast as they play): when the buffer never fell below floorMs
//   during a whole report period, the excess above floorMs is dropped.
// Every ~100 ms it posts {meanBufferedMs, bufferedMs, underruns, dropped} for the latency
// read-out: meanBufferedMs is the depth averaged over every render quantum since the last
// report, which is the mean time a sample waits here (a FIFO's mean delay is its mean depth).
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.target = Math.round((sampleRate * o.targetMs) / 1000);
    this.cap = Math.round((sampleRate * o.maxMs) / 1000);
    this.floor = Math.round((sampleRate * o.floorMs) / 1000);
    this.minDepth = Infinity; // lowest depth this report period, while playing
    this.ring = new Float32Array(sampleRate); // 1 s: far above cap + one frame
    this.read = 0;
    this.size = 0;
    this.playing = false;
    this.underruns = 0;
    this.dropped = 0;
    this.sinceReport = 0;
    this.depthSum = 0; // sum over quanta of the depth (samples) at the start of each
    this.quanta = 0;
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
    this.depthSum += this.size;
    this.quanta++;
    if (this.playing) this.minDepth = Math.min(this.minDepth, this.size);
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
      if (this.playing && this.minDepth !== Infinity && this.minDepth > this.floor) {
        this.skip(this.minDepth - this.floor); // a standing excess: latency for nothing
      }
      this.minDepth = Infinity;
      this.port.postMessage({
        meanBufferedMs: (this.depthSum * 1000) / this.quanta / sampleRate,
        bufferedMs: (this.size * 1000) / sampleRate,
        underruns: this.underruns,
        dropped: this.dropped,
      });
      this.sinceReport = this.depthSum = this.quanta = 0;
    }
    return true;
  }
}

registerProcessor("playback", PlaybackProcessor);
