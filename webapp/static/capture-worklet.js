// Capture processor: collects the microphone's 128-sample render quanta into
// fixed-size frames (20 ms by default) of mono signed 16-bit little-endian PCM
// and posts each frame's ArrayBuffer (transferred, not copied) to the main thread.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frameSamples = options.processorOptions.frameSamples;
    this.frame = new ArrayBuffer(this.frameSamples * 2);
    this.view = new DataView(this.frame);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input connected yet
    const n = channels[0].length;
    for (let i = 0; i < n; i++) {
      // Down-mix to mono in case the device ignored channelCount: 1.
      let x = 0;
      for (let c = 0; c < channels.length; c++) x += channels[c][i];
      x /= channels.length;
      const clipped = Math.max(-1, Math.min(1, x));
      this.view.setInt16(this.filled * 2, Math.round(clipped * 32767), true);
      if (++this.filled === this.frameSamples) {
        this.port.postMessage(this.frame, [this.frame]);
        this.frame = new ArrayBuffer(this.frameSamples * 2);
        this.view = new DataView(this.frame);
        this.filled = 0;
      }
    }
    return true; // outputs stay silent; we only listen
  }
}

registerProcessor("capture", CaptureProcessor);
