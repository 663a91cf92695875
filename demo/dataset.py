"""Feature cache: streams rendered once, turned into runtime-identical chunk features, and
stored on disk so training epochs only read arrays.

Layout of a split folder (demo/.cache/features/<split>-<first>-<count>-v<DATA_VERSION>/):
  features.npy  float16 [total_chunks, 128, 40]  (memory-mapped when training)
  offsets.npy   int64 [n_streams + 1]             chunk range of stream i: offsets[i]:offsets[i+1]
  labels.npy    int16 [total_chunks]              tasks.REPLIES index or streams.SILENT
  content.npy   int16 [total_chunks]              tasks.CONTENT_INDEX of what the chunk holds
  seeds.npy     int64 [n_streams]
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from listenloop.features import StreamingLogMel
from listenloop.protocol import CHUNK_SAMPLES

from . import streams

FEATURE_DIR = Path(__file__).resolve().parent / ".cache" / "features"
DATA_VERSION = 3  # bump when stream generation changes, so a stale feature cache is never reused


def stream_features(audio: np.ndarray) -> np.ndarray:
    """[n_chunks, 128, 40] float32 exactly as the runtime computes them chunk by chunk
    (running-max floor from the stream's start, reflect padding at each chunk's right edge)."""
    if len(audio) % CHUNK_SAMPLES:
        raise ValueError(f"audio length {len(audio)} is not a multiple of {CHUNK_SAMPLES}")
    mel = StreamingLogMel()
    return np.stack([mel(c) for c in audio.reshape(-1, CHUNK_SAMPLES)])


def _render(args: tuple[int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seed, split = args
    stream = streams.make_stream(seed, split)
    return stream_features(stream.audio).astype(np.float16), stream.labels(), stream.content()


@dataclass
class FeatureSet:
    features: np.ndarray  # float16 [total_chunks, 128, 40]
    offsets: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray
    content: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.seeds)

    def _chunks(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def stream(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        chunks = self._chunks(i)
        return self.features[chunks], self.labels[chunks]

    def content_of(self, i: int) -> np.ndarray:
        if self.content is None:
            raise ValueError("this feature set has no per-chunk content labels")
        return self.content[self._chunks(i)]


def split_dir(split: str, first_seed: int, count: int) -> Path:
    return FEATURE_DIR / f"{split}-{first_seed}-{count}-v{DATA_VERSION}"


def build(split: str, first_seed: int, count: int, workers: int = 2, log_every: int = 200) -> Path:
    """Render streams first_seed..first_seed+count-1 of `split` and write their features."""
    out = split_dir(split, first_seed, count)
    if (out / "seeds.npy").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    features: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    content: list[np.ndarray] = []
    started = time.perf_counter()
    jobs = [(seed, split) for seed in range(first_seed, first_seed + count)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, (feats, labs, cont) in enumerate(pool.map(_render, jobs, chunksize=8), start=1):
            features.append(feats)
            labels.append(labs)
            content.append(cont)
            if i % log_every == 0 or i == count:
                rate = i / (time.perf_counter() - started)
                print(f"[features] {split}: {i}/{count} streams, {rate:.1f} streams/s", flush=True)
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in features])]).astype(np.int64)
    np.save(out / "features.npy", np.concatenate(features))
    np.save(out / "offsets.npy", offsets)
    np.save(out / "labels.npy", np.concatenate(labels))
    np.save(out / "content.npy", np.concatenate(content))
    np.save(out / "seeds.npy", np.arange(first_seed, first_seed + count, dtype=np.int64))  # written last: marks complete
    return out


def load(path: Path) -> FeatureSet:
    path = Path(path)
    if not (path / "seeds.npy").exists():
        raise FileNotFoundError(f"no complete feature set in {path}")
    return FeatureSet(
        features=np.load(path / "features.npy", mmap_mode="r"),
        offsets=np.load(path / "offsets.npy"),
        labels=np.load(path / "labels.npy"),
        seeds=np.load(path / "seeds.npy"),
        content=np.load(path / "content.npy") if (path / "content.npy").exists() else None,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Render streams and cache their chunk features.")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(build(args.split, args.first_seed, args.count, args.workers))
