"""Feature cache: streams rendered once, turned into the runtime's chunk log-mel, and stored on
disk so training epochs only read arrays.

Layout of a set folder (demo/.cache/features/<set>-<first>-<count>-v<DATA_VERSION>/), where a set
is a split ("train", "eval"), "pairs" (streams.make_pair_stream, training voices), "real" or "own"
(training negatives, demo/negatives.py) or "real-eval" (held-out real recordings):
  log10.npy     float16 [total_chunks, 128, 40]  log10 mel power before the peak floor
                (memory-mapped when training); `normalised` applies the floor from any restart
                of the running peak, as the runtime does after a context reset
  peaks.npy     float32 [total_chunks]            each chunk's maximum log10 power, taken before the
                                                  float16 rounding of log10.npy
  offsets.npy   int64 [n_streams + 1]             chunk range of stream i: offsets[i]:offsets[i+1]
  labels.npy    int16 [total_chunks]              tasks.REPLIES index or streams.SILENT
  content.npy   int16 [total_chunks]              tasks.CONTENT_INDEX of what the chunk holds
  items.npy     int64 [n_items, 5]                stream, first chunk, end chunk (exclusive, both
                within the stream), tasks.CONTENT_INDEX, index into texts.json (-1: no text)
  texts.json    the spoken texts of the items
  seeds.npy     int64 [n_streams]
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from listenloop.features import StreamingLogMel, normalise
from listenloop.protocol import CHUNK_SAMPLES

from . import negatives, streams, tasks

FEATURE_DIR = Path(__file__).resolve().parent / ".cache" / "features"
DATA_VERSION = 5  # bump when stream generation changes, so a stale feature cache is never reused
SETS = ("train", "eval", "pairs", "real", "own", "real-eval")


def stream_features(audio: np.ndarray) -> np.ndarray:
    """[n_chunks, 128, 40] float32 exactly as the runtime computes them chunk by chunk
    (running-max floor from the stream's start, reflect padding at each chunk's right edge)."""
    if len(audio) % CHUNK_SAMPLES:
        raise ValueError(f"audio length {len(audio)} is not a multiple of {CHUNK_SAMPLES}")
    mel = StreamingLogMel()
    return np.stack([mel(c) for c in audio.reshape(-1, CHUNK_SAMPLES)])


def stream_log10(audio: np.ndarray) -> np.ndarray:
    """[n_chunks, 128, 40] float32 log10 mel power of each chunk, before the peak floor."""
    if len(audio) % CHUNK_SAMPLES:
        raise ValueError(f"audio length {len(audio)} is not a multiple of {CHUNK_SAMPLES}")
    mel = StreamingLogMel()
    return np.stack([mel.log10(c) for c in audio.reshape(-1, CHUNK_SAMPLES)])


def normalised(log10: np.ndarray, peaks: np.ndarray, restart: int = 0, gain_log10: float = 0.0) -> np.ndarray:
    """Features of consecutive chunks as the runtime normalises them when its running peak
    restarted at chunk `restart` of these (docs/PROTOCOL.md, "Log-mel"): chunks before it keep
    the peak running from the first one. `gain_log10` plays the audio louder (positive) or
    quieter: a gain of g dB adds g/10 to every log10 power and to the peaks."""
    log10 = np.asarray(log10, np.float32) + np.float32(gain_log10)
    return normalise(log10, normalised_peaks(peaks, restart, gain_log10)[:, None, None])


def normalised_peaks(peaks: np.ndarray, restart: int = 0, gain_log10: float = 0.0) -> np.ndarray:
    """The running peak each chunk is normalised with, restarted at chunk `restart`."""
    peaks = np.asarray(peaks, np.float32) + np.float32(gain_log10)
    return np.concatenate([np.maximum.accumulate(peaks[:restart]), np.maximum.accumulate(peaks[restart:])])


def _stream(seed: int, kind: str) -> streams.Stream:
    if kind == "pairs":
        return streams.make_pair_stream(seed)
    if kind in ("real", "real-eval"):
        return negatives.make_real_stream(seed, "eval" if kind == "real-eval" else "train")
    if kind == "own":
        return negatives.make_own_stream(seed)
    return streams.make_stream(seed, kind)


def _render(args: tuple[int, str]):
    seed, kind = args
    stream = _stream(seed, kind)
    log10 = stream_log10(stream.audio)
    items = []
    for seg in stream.segments:
        first, end = seg.start // CHUNK_SAMPLES, min(stream.n_chunks, streams.reply_chunk(seg.end) + 1)
        items.append((first, end, tasks.CONTENT_INDEX[seg.name], seg.text))
    return log10.astype(np.float16), log10.max(axis=(1, 2)), stream.labels(), stream.content(), items


@dataclass
class FeatureSet:
    log10: np.ndarray  # float16 [total_chunks, 128, 40]
    peaks: np.ndarray  # float32 [total_chunks]
    offsets: np.ndarray
    labels: np.ndarray
    content: np.ndarray
    items: np.ndarray  # int64 [n_items, 5], see the module doc
    texts: list[str]
    seeds: np.ndarray

    def __len__(self) -> int:
        return len(self.seeds)

    def chunks(self, i: int) -> slice:
        """Stream i's rows in the set's chunk arrays."""
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def stream(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream i's features as the runtime computes them from the stream's start, and its labels."""
        chunks = self.chunks(i)
        return normalised(self.log10[chunks], self.peaks[chunks]), self.labels[chunks]

    def n_chunks(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def stream_labels(self, i: int) -> np.ndarray:
        return self.labels[self.chunks(i)]

    def content_of(self, i: int) -> np.ndarray:
        return self.content[self.chunks(i)]

    def window(self, i: int, first: int, end: int, restart: int = 0, gain_log10: float = 0.0) -> np.ndarray:
        """Features of chunks first..end-1 of stream i with the running peak restarted at chunk
        `restart` of the stream (0: from its start), louder by `gain_log10` (see `normalised`)."""
        rows = self.chunks(i)
        running = normalised_peaks(self.peaks[rows][:end], restart, gain_log10)[first:]
        mel = np.asarray(self.log10[rows.start + first : rows.start + end], np.float32) + np.float32(gain_log10)
        return normalise(mel, running[:, None, None])


def set_dir(kind: str, first_seed: int, count: int) -> Path:
    return FEATURE_DIR / f"{kind}-{first_seed}-{count}-v{DATA_VERSION}"


def build(kind: str, first_seed: int, count: int, workers: int = 2, log_every: int = 200) -> Path:
    """Render streams first_seed..first_seed+count-1 of a set (SETS) and write their features."""
    if kind not in SETS:
        raise ValueError(f"set must be one of {SETS}, got {kind!r}")
    out = set_dir(kind, first_seed, count)
    if (out / "seeds.npy").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    log10, peaks, labels, content, items, texts = [], [], [], [], [], {}
    started = time.perf_counter()
    jobs = [(seed, kind) for seed in range(first_seed, first_seed + count)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, (mel, peak, labs, cont, its) in enumerate(pool.map(_render, jobs, chunksize=8)):
            log10.append(mel)
            peaks.append(peak)
            labels.append(labs)
            content.append(cont)
            items += [(i, first, end, cls, texts.setdefault(text, len(texts)) if text else -1)
                      for first, end, cls, text in its]
            if (i + 1) % log_every == 0 or i + 1 == count:
                rate = (i + 1) / (time.perf_counter() - started)
                print(f"[features] {kind}: {i + 1}/{count} streams, {rate:.1f} streams/s", flush=True)
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in log10])]).astype(np.int64)
    np.save(out / "log10.npy", np.concatenate(log10))
    np.save(out / "peaks.npy", np.concatenate(peaks).astype(np.float32))
    np.save(out / "offsets.npy", offsets)
    np.save(out / "labels.npy", np.concatenate(labels))
    np.save(out / "content.npy", np.concatenate(content))
    np.save(out / "items.npy", np.asarray(items, np.int64).reshape(-1, 5))
    (out / "texts.json").write_text(json.dumps(list(texts)))
    np.save(out / "seeds.npy", np.arange(first_seed, first_seed + count, dtype=np.int64))  # written last: marks complete
    return out


def load(path: Path) -> FeatureSet:
    path = Path(path)
    if not (path / "seeds.npy").exists():
        raise FileNotFoundError(f"no complete feature set in {path}")
    return FeatureSet(
        log10=np.load(path / "log10.npy", mmap_mode="r"),
        peaks=np.load(path / "peaks.npy"),
        offsets=np.load(path / "offsets.npy"),
        labels=np.load(path / "labels.npy"),
        content=np.load(path / "content.npy"),
        items=np.load(path / "items.npy"),
        texts=json.loads((path / "texts.json").read_text()),
        seeds=np.load(path / "seeds.npy"),
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Render streams and cache their chunk features.")
    parser.add_argument("--set", dest="kind", choices=SETS, default="train",
                        help="a split; pairs: confusable items in one voice; real, own: real recordings and "
                             "the device's own replies (training, demo/negatives.py); real-eval: held-out real recordings")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(build(args.kind, args.first_seed, args.count, args.workers))
