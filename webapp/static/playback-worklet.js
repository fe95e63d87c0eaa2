// Playback processor: a small jitter buffer in front of the speakers.
// Receives ArrayBuffers of mono int16 LE PCM via port.postMessage ("reset" empties it).
// - Starts (and restarts after an underrun) once targetMs of audio is buffered; on an
//   underrun it outputs silence rather than stalling.
// - Above maxMs it drops the oldest samples back down to targetMs, so latency
//   can never grow without bound when the network delivers bursts.
// - Audio that arrives in a burst after a stall would otherwise stay queued for good
//   (frames come in as fast as they play): when the buffer never fell below floorMs
//   during a whole report period, the excess above floorMs is dropped.
// A planned move (make-before-break): {nextSkip: n} opens a second buffer for the new
// node's answers ({next: ArrayBuffer}), skipping their first n samples (the warm-up
// silence of a fresh stream); once it holds targetMs the output crossfades to it over
// fadeMs, it becomes the buffer, and the processor posts {switched: true} (the page then
// stops the old stream). "drop-next" abandons it, "next-now" switches at once.
// Every ~100 ms it posts {meanBufferedMs, underruns, longestGapMs, gaps}: meanBufferedMs is
// the depth averaged over the render quanta since the last report, the mean time a sample
// waits here (a FIFO's mean delay is its mean depth); longestGapMs the longest run of silent
// output (underruns and silence the node sent) since playback first started or the last
// "gap-reset"; gaps the last silences of GAP_LOGGED samples or more, with the context time
// each ended.
const SILENT = 1e-4;
const GAP_LOGGED = 128; // silences this long (samples) or longer are listed with their end

class Ring {
  constructor(samples) {
    this.buf = new Float32Array(samples);
    this.read = 0;
    this.size = 0;
  }

  // Appends `data`; past `cap` samples it keeps only the newest `keep`.
  push(data, cap, keep) {
    const view = new DataView(data);
    const n = data.byteLength >> 1;
    const len = this.buf.length;
    for (let i = 0; i < n; i++) {
      if (this.size === len) this.skip(1);
      this.buf[(this.read + this.size) % len] = view.getInt16(i * 2, true) / 32768;
      this.size++;
    }
    if (this.size > cap) this.skip(this.size - keep);
  }

  pop() {
    const x = this.buf[this.read];
    this.read = (this.read + 1) % this.buf.length;
    this.size--;
    return x;
  }

  skip(n) {
    this.read = (this.read + n) % this.buf.length;
    this.size -= n;
  }

  clear() {
    this.size = 0;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.target = Math.round((sampleRate * o.targetMs) / 1000);
    this.cap = Math.round((sampleRate * o.maxMs) / 1000);
    this.floor = Math.round((sampleRate * o.floorMs) / 1000);
    this.fadeLen = Math.max(1, Math.round((sampleRate * (o.fadeMs || 30)) / 1000));
    this.minDepth = Infinity; // lowest depth this report period, while playing
    this.ring = new Ring(sampleRate); // 1 s: far above cap + one frame
    this.next = null; // the new node's buffer during a move
    this.nextSkip = 0; // samples of the new node's answers still to skip
    this.fade = -1; // samples into the crossfade; -1: none
    this.playing = false;
    this.underruns = 0;
    this.sinceReport = 0;
    this.depthSum = 0; // sum over quanta of the depth (samples) at the start of each
    this.quanta = 0;
    this.gap = 0; // silent output samples in a row
    this.longestGap = 0;
    this.gaps = []; // the last 50 silences of GAP_LOGGED or more: {ms, end (context time)}
    this.measuring = false; // from the first playback on
    this.port.onmessage = (e) => this.message(e.data);
  }

  message(data) {
    if (data === "reset") {
      this.ring.clear();
      this.playing = false;
    } else if (data && data.nextSkip !== undefined) {
      this.next = new Ring(sampleRate);
      this.nextSkip = data.nextSkip; // the new model's warm-up: silence, not the voice
      this.fade = -1;
    } else if (data === "next-now" && this.next) { // the old stream is gone: no fade
      this.adopt();
      this.playing = false; // restarts at the target depth
    } else if (data === "drop-next") {
      this.next = null;
      this.fade = -1;
    } else if (data === "gap-reset") {
      this.gap = this.longestGap = 0;
      this.gaps = [];
    } else if (data instanceof ArrayBuffer) {
      this.ring.push(data, this.cap, this.target);
    } else if (data && data.next instanceof ArrayBuffer && this.next) {
      const skip = Math.min(this.nextSkip, data.next.byteLength >> 1);
      this.nextSkip -= skip;
      if (skip * 2 === data.next.byteLength) return;
      this.next.push(skip ? data.next.slice(skip * 2) : data.next, this.cap, this.target);
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    this.depthSum += this.ring.size;
    this.quanta++;
    if (this.playing) this.minDepth = Math.min(this.minDepth, this.ring.size);
    if (!this.playing && this.ring.size >= this.target) this.playing = true;
    if (this.next && this.fade < 0 && this.next.size >= this.target) this.fade = 0;
    let i = 0;
    if (this.fade >= 0) i = this.crossfade(out);
    else if (this.playing) i = this.play(out, 0);
    out.fill(0, i);
    this.measure(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) this.report();
    return true;
  }

  // Old buffer fading out, new one fading in (equal-gain: both carry the same voice);
  // either may run dry meanwhile (the old node may close), the other carries on.
  crossfade(out) {
    let i = 0;
    for (; i < out.length && this.fade < this.fadeLen; i++, this.fade++) {
      const g = this.fade / this.fadeLen;
      const a = this.ring.size > 0 ? this.ring.pop() : 0;
      const b = this.next.size > 0 ? this.next.pop() : 0;
      out[i] = a * (1 - g) + b * g;
    }
    if (this.fade >= this.fadeLen) {
      this.adopt();
      this.playing = true;
      this.minDepth = Infinity;
      this.port.postMessage({ switched: true, at: currentTime });
      i = this.play(out, i);
    }
    return i;
  }

  // The new node's buffer becomes the buffer.
  adopt() {
    this.ring = this.next;
    this.next = null;
    this.fade = -1;
  }

  // Plays the buffer into out from i on; returns where it stopped (an underrun if early).
  play(out, i) {
    for (; i < out.length && this.ring.size > 0; i++) out[i] = this.ring.pop();
    if (i < out.length) {
      this.playing = false;
      this.underruns++;
    }
    return i;
  }

  measure(out) {
    if (this.playing) this.measuring = true;
    if (!this.measuring) return;
    for (let i = 0; i < out.length; i++) {
      if (Math.abs(out[i]) < SILENT) {
        if (++this.gap > this.longestGap) this.longestGap = this.gap;
      } else {
        if (this.gap >= GAP_LOGGED) {
          this.gaps.push({ ms: (this.gap * 1000) / sampleRate, end: currentTime + i / sampleRate });
          if (this.gaps.length > 50) this.gaps.shift();
        }
        this.gap = 0;
      }
    }
  }

  report() {
    if (this.playing && this.fade < 0 && this.minDepth !== Infinity && this.minDepth > this.floor) {
      this.ring.skip(this.minDepth - this.floor); // a standing excess: latency for nothing
    }
    this.minDepth = Infinity;
    this.port.postMessage({
      meanBufferedMs: (this.depthSum * 1000) / this.quanta / sampleRate,
      underruns: this.underruns,
      longestGapMs: (this.longestGap * 1000) / sampleRate,
      gaps: this.gaps.slice(),
    });
    this.sinceReport = this.depthSum = this.quanta = 0;
  }
}

registerProcessor("playback", PlaybackProcessor);
