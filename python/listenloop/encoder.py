"""The audio encoder run at a fixed batch of B chunks (docs/DESIGN.md, "Fixed-slot batching").

`ChunkBatch` owns B rows of mel staging and B rows of audio vectors, bound to the encoder once:
shapes and addresses never change, which is what a captured CUDA graph replays. Two users:

- a SlotPool (B = its slots): every chunk of a scheduler round in one encoder call, one row
  per slot; rows of slots without a chunk are computed and ignored;
- Model.encode of one chunk when the profile captures the encoder as a CUDA graph (B = 1).

The encoder treats chunks independently and the batch is always B, so a chunk's vectors are
the same whatever the other rows hold: the same kernels at the same shapes.
"""
from __future__ import annotations

import numpy as np

from .errors import ModelOutputError
from .kv_cache import ONNX_FLOAT, Binder, pinned_zeros
from .protocol import FRAMES_PER_CHUNK, N_MELS, VECTORS_PER_CHUNK


class ChunkBatch:
    """`graph_id`: the encoder's CUDA graph id for this batch (Model.encoder_graph_id gives
    each batch its own: a graph is replayed at the shapes and addresses it was captured with)."""

    def __init__(self, model, batch: int, graph_id: int | None = None):
        self._memory = []  # page-locked: async-capable copies to a GPU
        self.mel = pinned_zeros((batch, N_MELS, FRAMES_PER_CHUNK), np.float32, self._memory)
        self.audio = pinned_zeros((batch, VECTORS_PER_CHUNK, model.hidden), np.float32, self._memory)
        options = None
        if model.encoder_graphs:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self._binder = b = Binder(model.encoder, options)
        self._device = None
        if model.encoder_graphs:  # a replayed graph reads and writes device memory only
            import onnxruntime as ort

            self._device = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in (self.mel, self.audio)]
            b.io.bind_ortvalue_input("mel", self._device[0])
            b.io.bind_ortvalue_output("audio_embeds", self._device[1])
        else:
            cpu = b.device("cpu")
            b.bind_input("mel", cpu, ONNX_FLOAT, list(self.mel.shape), self.mel.ctypes.data)
            b.bind_output("audio_embeds", cpu, ONNX_FLOAT, list(self.audio.shape), self.audio.ctypes.data)

    def stage(self, row: int, mel: np.ndarray) -> None:
        """One chunk's normalised log-mel [128, 40] into row `row` of the next call."""
        self.mel[row] = mel

    def run(self) -> None:
        """One encoder call for all B rows; row r's vectors are then `vectors(r)` (rewritten
        by the next call; each caller checks its own row, since rows are independent)."""
        if self._device is None:
            self._binder.run()
        else:
            self._device[0].update_inplace(self.mel)
            self._binder.run()
            self.audio[...] = self._device[1].numpy()  # OrtValue offers no copy into an existing array

    def vectors(self, row: int) -> np.ndarray:
        """A copy of row `row`'s audio vectors [10, H]; ModelOutputError when not finite."""
        return finite_vectors(self.audio[row].copy())


def finite_vectors(audio: np.ndarray) -> np.ndarray:
    """`audio` (encoder output) itself; ModelOutputError when it holds NaN or infinite numbers."""
    if not np.isfinite(audio).all():
        raise ModelOutputError("the encoder computed NaN or infinite audio vectors")
    return audio
