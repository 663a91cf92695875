// AudioWorklet processor: microphone audio at the AudioContext rate in, 16 kHz mono float32
// blocks out (posted to the main thread).
//
// Resampling is band-limited interpolation with a Kaiser-windowed sinc kernel: every output
// sample is the input convolved with a low-pass filter evaluated at the output instant. When
// downsampling, the cutoff sits at 0.45 x the output rate (7.2 kHz for 16 kHz output), so the
// filter is the anti-alias low-pass and the interpolator at once; when upsampling it sits at
// 0.45 x the input rate. The kernel spans 16 zero crossings each side (Kaiser beta 8, about
// 80 dB of stop-band rejection) and is read from a table sampled 64 times per input sample
// with linear interpolation between entries.

const OUT_RATE = 16000;
const ZERO_CROSSINGS = 16;
const KAISER_BETA = 8.0;
const TABLE_STEPS = 64; // kernel table entries per input sample

function besselI0(x) {
  let sum = 1.0;
  let term = 1.0;
  const q = (x * x) / 4.0;
  for (let k = 1; k < 50; k++) {
    term *= q / (k * k);
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    const cutoff = 0.45 * Math.min(1.0, outRate / inRate); // cycles per input sample
    this.halfWidth = ZERO_CROSSINGS / (2.0 * cutoff); // kernel half width, in input samples
    const entries = Math.ceil(this.halfWidth * TABLE_STEPS) + 2;
    this.table = new Float32Array(entries);
    const i0beta = besselI0(KAISER_BETA);
    for (let i = 0; i < entries; i++) {
      const x = i / TABLE_STEPS;
      const r = x / this.halfWidth;
      if (r >= 1.0) {
        this.table[i] = 0.0;
        continue;
      }
      const arg = 2.0 * cutoff * x;
      const sinc = x === 0 ? 1.0 : Math.sin(Math.PI * arg) / (Math.PI * arg);
      const window = besselI0(KAISER_BETA * Math.sqrt(1.0 - r * r)) / i0beta;
      this.table[i] = 2.0 * cutoff * sinc * window;
    }
    // Input history: samples [base, base + length) of the stream.
    this.hist = new Float32Array(8192);
    this.length = 0;
    this.base = 0;
    this.next = 0; // stream position (in input samples) of the next output sample
  }

  kernel(distance) {
    const pos = Math.abs(distance) * TABLE_STEPS;
    const i = pos | 0;
    if (i + 1 >= this.table.length) return 0.0;
    const frac = pos - i;
    return this.table[i] + (this.table[i + 1] - this.table[i]) * frac;
  }

  // Appends input samples; returns the output samples that are now fully determined.
  process(input) {
    if (this.length + input.length > this.hist.length) {
      const grown = new Float32Array(Math.max(this.hist.length * 2, this.length + input.length));
      grown.set(this.hist.subarray(0, this.length));
      this.hist = grown;
    }
    this.hist.set(input, this.length);
    this.length += input.length;

    const out = [];
    const end = this.base + this.length; // one past the last input sample
    const hw = this.halfWidth;
    while (this.next + hw < end) {
      const t = this.next;
      const first = Math.max(Math.ceil(t - hw), this.base);
      const last = Math.floor(t + hw);
      let acc = 0.0;
      for (let n = first; n <= last; n++) {
        acc += this.hist[n - this.base] * this.kernel(t - n);
      }
      out.push(acc);
      this.next += this.step;
    }

    // Keep only the history the next output still needs.
    const keepFrom = Math.max(this.base, Math.floor(this.next - hw) - 1);
    const drop = keepFrom - this.base;
    if (drop > 0) {
      this.hist.copyWithin(0, drop, this.length);
      this.length -= drop;
      this.base = keepFrom;
      // Rebase positions so they stay small numbers (exact in float64 either way).
      this.next -= this.base;
      this.base = 0;
    }
    return out;
  }
}

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    const blockMs = opts.blockMs || 50;
    this.blockSize = Math.round((OUT_RATE * blockMs) / 1000);
    this.resampler = new Resampler(sampleRate, OUT_RATE); // sampleRate: the AudioContext's rate
    this.block = new Float32Array(this.blockSize);
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "stop") this.running = false;
    };
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    // Mono: the first channel (the capture asks for one channel; extra ones are averaged).
    let mono = input[0];
    if (input.length > 1) {
      mono = new Float32Array(input[0].length);
      for (const channel of input) {
        for (let i = 0; i < channel.length; i++) mono[i] += channel[i] / input.length;
      }
    }
    const samples = this.resampler.process(mono);
    for (let i = 0; i < samples.length; i++) {
      this.block[this.filled++] = samples[i];
      if (this.filled === this.blockSize) {
        this.port.postMessage(this.block, [this.block.buffer]);
        this.block = new Float32Array(this.blockSize);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCaptureProcessor);
