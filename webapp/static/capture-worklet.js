// Capture processor: collects the microphone's render quanta into frames of mono int16
// LE PCM and posts each (transferred, not copied) as {buf, end, meanFillMs}: `end` is the
// context time just after the frame's last sample, meanFillMs the frame's fill averaged
// over its render quanta (the mean time a sample waits here before it is sent).
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frameSamples = options.processorOptions.frameSamples;
    this.frame = new ArrayBuffer(this.frameSamples * 2);
    this.view = new DataView(this.frame);
    this.filled = 0;
    this.fillSum = 0; // sum over render quanta of samples waiting, for meanFillMs
    this.quanta = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input connected yet
    const n = channels[0].length;
    this.fillSum += this.filled + n / 2; // mean waiting during this quantum
    this.quanta++;
    for (let i = 0; i < n; i++) {
      // Down-mix to mono in case the device ignored channelCount: 1.
      let x = 0;
      for (let c = 0; c < channels.length; c++) x += channels[c][i];
      x /= channels.length;
      const clipped = Math.max(-1, Math.min(1, x));
      this.view.setInt16(this.filled * 2, Math.round(clipped * 32767), true);
      if (++this.filled === this.frameSamples) {
        const end = currentTime + (i + 1) / sampleRate;
        const meanFillMs = (1000 * this.fillSum) / this.quanta / sampleRate;
        this.port.postMessage({ buf: this.frame, end, meanFillMs }, [this.frame]);
        this.fillSum = this.quanta = 0;
        this.frame = new ArrayBuffer(this.frameSamples * 2);
        this.view = new DataView(this.frame);
        this.filled = 0;
      }
    }
    return true; // outputs stay silent; we only listen
  }
}

registerProcessor("capture", CaptureProcessor);
