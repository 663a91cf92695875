"""The KV caches of S streams in one set of buffers, and one decoder call for all their steps
(docs/DESIGN.md, "Fixed-slot batching").

`SlotPool` (one per Model, when the profile sets `"slots"`) owns, for every layer, one key and
one value buffer `[S, KVH, C + 13, D]` and the staging of the slot decoder (export/slot_graph.py):
`[S, 13, H]` input rows, per-slot past length, new length and logits row, and `[S, V]` logits.
Every binding is made once: shapes and addresses never change, which is what a CUDA graph
capture needs. `step()` runs one call; slots that staged nothing run with no real rows and
their results are ignored.

The pool also owns a ChunkBatch of S rows (encoder.py): the chunks of one scheduler round are
encoded in one call, each in its stream's slot row.

`SlotCache` is one stream's slot behind the interface of kv_cache.py: `encode_steps(mel)`
stages a chunk in the slot's encoder row and yields for the shared encoder call; `run(T)`
stages the stream's tokens in pieces of up to 13 rows, one piece per step (a prompt or a
re-prefill takes several steps, a listening step one, a reply token one), and yields after
each for the step to be made. `round()` makes the shared calls that waiting streams need and
resumes them: the scheduler's batched rounds and the benchmarks drive streams with it.

A stream's numbers do not depend on its slot index or on what the other slots hold: the graph
computes each slot's rows by themselves with the same kernels at the same shapes. A slot given
to a new stream starts from zeros (host buffers); rows above a stream's length are never read
with a weight other than zero.

Threads: steps are made by one thread (the Runtime's model thread, or a caller driving its
own streams); opening and closing streams from other threads is safe (one lock).
"""
from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from .encoder import ChunkBatch
from .errors import CapacityError, ProtocolError, SessionClosedError
from .kv_cache import DECODER_STEP, ENCODER_CALL, ONNX_FLOAT, ONNX_FLOAT16, ONNX_INT64, Binder, drive, pinned_zeros
from .protocol import STEP

log = logging.getLogger("listenloop")

SLOT_GRAPH_ID = 1  # the CUDA graph id of the one captured step
CUDA_RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")  # newest first


def cuda_memset():
    """`memset(pointer, byte, nbytes)` for device memory: the CUDA runtime's cudaMemset followed
    by cudaDeviceSynchronize (so no later step, on whichever stream, reads before it), through
    ctypes from the CUDA runtime ONNX Runtime's CUDA provider has loaded; None without one."""
    import ctypes

    for name in CUDA_RUNTIMES:
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        memset, synchronize = cudart.cudaMemset, cudart.cudaDeviceSynchronize
        memset.argtypes, memset.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], ctypes.c_int
        synchronize.argtypes, synchronize.restype = [], ctypes.c_int

        def device_memset(pointer: int, byte: int, nbytes: int) -> None:
            if memset(pointer, byte, nbytes) or synchronize():
                raise RuntimeError(f"cudaMemset of {nbytes} bytes failed")

        return device_memset
    return None


def zero_slot(pointers: list, slot: int, slot_nbytes: int, memset) -> None:
    """Zero slot `slot`'s region in each buffer [S, ...] at `pointers` (slot-major: a slot's
    region is `slot_nbytes` contiguous bytes) with `memset(pointer, byte, nbytes)`."""
    for pointer in pointers:
        memset(pointer + slot * slot_nbytes, 0, slot_nbytes)


class SlotPool:
    """`graph_id`: the CUDA graph id of this pool's step (pools of other sizes on one session,
    as a benchmark makes them, each need their own: a graph is replayed at its captured shapes)."""

    def __init__(self, model, slots: int, graph_id: int = SLOT_GRAPH_ID):
        m = self.model = model
        self.slots = slots
        self.rows = m.capacity + STEP  # the last 13 take the rows that are not real (slot_graph.py)
        self.io_dtype = m.io_dtype
        self.shape = (slots, m.kv_heads, self.rows, m.head_dim)
        self.bytes_per_slot = 2 * m.layers * m.kv_heads * self.rows * m.head_dim * self.io_dtype.itemsize
        self._lock = threading.RLock()  # a finalizer may give a slot back on the stepping thread
        self._owned = [False] * slots
        self._generation = [0] * slots  # which owner a slot's SlotCache was: stale handles are refused
        self._memory = []
        self.embeds = self._host((slots, STEP, m.hidden), self.io_dtype)
        self.past_lengths = np.zeros(slots, np.int64)
        self.new_lengths = np.zeros(slots, np.int64)
        self.logits_index = np.zeros(slots, np.int64)
        self.logits = self._host((slots, m.vocab), np.float32)
        self._device = m.profile.kv_cache_device
        if self._device == "cuda":
            import onnxruntime as ort

            zeros = np.zeros(self.shape, self.io_dtype)  # once: device buffers start clean
            self._values = [ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0) for _ in range(2 * m.layers)]
            del zeros
            pointers = [v.data_ptr() for v in self._values]
            self.array = None
            self._device_memset = cuda_memset()
            if self._device_memset is None:
                log.warning("no CUDA runtime library (%s) to clear a slot on the device: a stream that computes "
                            "NaN may leave it in its slot", ", ".join(CUDA_RUNTIMES))
        else:
            self.array = self._host((2 * m.layers, *self.shape), self.io_dtype)
            pointers = [self.array[j].ctypes.data for j in range(2 * m.layers)]
            self._device_memset = None
        options = None
        if m.cuda_graphs:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self._binder = Binder(m.decoder, options)
        self._staging = _DeviceStaging(self, self._device) if m.cuda_graphs else None
        self._pointers = pointers
        self._bind(pointers)
        self.chunks = ChunkBatch(m, slots, m.encoder_graph_id() if m.encoder_graphs else None)

    def _host(self, shape, dtype) -> np.ndarray:
        """Zeroed page-locked host memory (async-capable copies to a GPU)."""
        return pinned_zeros(shape, dtype, self._memory)

    def _bind(self, pointers: list) -> None:
        b, m = self._binder, self.model
        cpu, dev = b.device("cpu"), b.device(self._device)
        io_type = ONNX_FLOAT16 if self.io_dtype == np.float16 else ONNX_FLOAT
        if self._staging is not None:
            self._staging.bind(b)
        else:
            b.bind_input("inputs_embeds", cpu, io_type, list(self.embeds.shape), self.embeds.ctypes.data)
            for name in ("past_lengths", "new_lengths", "logits_index"):
                array = getattr(self, name)
                b.bind_input(name, cpu, ONNX_INT64, [self.slots], array.ctypes.data)
            b.bind_output("logits", cpu, ONNX_FLOAT, list(self.logits.shape), self.logits.ctypes.data)
        for i in range(m.layers):
            for j, kind in enumerate(("key", "value")):
                b.bind_input(f"past_{kind}.{i}", dev, io_type, list(self.shape), pointers[2 * i + j])
                b.bind_output(f"present_{kind}.{i}", dev, io_type, list(self.shape), pointers[2 * i + j])

    # -- slots ---------------------------------------------------------------------------

    def acquire(self) -> tuple[int, int]:
        """A free slot, cleared, as (slot, generation); CapacityError when all S are taken."""
        with self._lock:
            for slot, owned in enumerate(self._owned):
                if not owned:
                    self._owned[slot] = True
                    self._generation[slot] += 1
                    self.new_lengths[slot] = 0
                    self._clear(slot)
                    return slot, self._generation[slot]
        raise CapacityError(f"no free KV-cache slot: profile {self.model.profile.name!r} has \"slots\": {self.slots}, "
                            "every one in use; close a session first, or use a profile with more slots")

    def release(self, slot: int, generation: int) -> None:
        with self._lock:
            if self._owned[slot] and self._generation[slot] == generation:
                self._owned[slot] = False
                self.new_lengths[slot] = 0

    def clear(self, slot: int, generation: int) -> None:
        with self._lock:
            self._check(slot, generation)
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        # A stream's rows above its length get attention weight zero, but 0 x NaN is NaN: a
        # slot is zeroed when it changes hands and after NaN (docs/DESIGN.md, "Fixed-slot batching").
        if self.array is not None:
            self.array[:, slot] = 0
        elif self._device_memset is not None:
            zero_slot(self._pointers, slot, self.bytes_per_slot // (2 * self.model.layers), self._device_memset)

    def in_use(self) -> int:
        with self._lock:
            return sum(self._owned)

    def _check(self, slot: int, generation: int) -> None:
        if not self._owned[slot] or self._generation[slot] != generation:
            raise SessionClosedError("this stream's slot was given back (the stream is closed)")

    # -- steps ---------------------------------------------------------------------------

    def stage(self, slot: int, generation: int, embeds: np.ndarray, past: int, row: int) -> None:
        """Slot `slot`'s part of the next step: `embeds` (up to 13 rows) at positions past..,
        logits of row `row`."""
        n = len(embeds)
        if not 0 < n <= STEP or past + n > self.model.capacity:
            raise ProtocolError(f"a slot step takes 1 to {STEP} rows inside the capacity {self.model.capacity}, "
                                f"got {n} rows at {past}")
        with self._lock:
            self._check(slot, generation)
            self.embeds[slot, :n] = embeds
            self.past_lengths[slot], self.new_lengths[slot], self.logits_index[slot] = past, n, row

    def stage_chunk(self, slot: int, generation: int, mel: np.ndarray) -> None:
        """Slot `slot`'s chunk [128, 40] for the next encoder call."""
        with self._lock:
            self._check(slot, generation)
            self.chunks.stage(slot, mel)

    def encode(self) -> None:
        """One encoder call for every slot's row (rows that staged nothing are ignored)."""
        with self._lock:
            self.chunks.run()

    def make(self, call: str) -> None:
        """The shared call a stream waits for: ENCODER_CALL or DECODER_STEP."""
        if call == ENCODER_CALL:
            self.encode()
        else:
            self.step()

    def round(self, waiting: dict) -> dict:
        """One round for the units waiting on this pool. `waiting` maps a key to
        [generator, the call it waits for]. The encoder call is made while any unit waits for
        it, then one decoder step; each waiting unit is resumed after its call. Units that end
        leave `waiting`, and their values are returned as {key: value}. A failed call is raised
        inside every unit that waited for it."""
        ended = {}

        def call(kind, make) -> bool:
            keys = [key for key, (_, waits_for) in waiting.items() if waits_for == kind]
            if not keys:
                return False
            failure = None
            try:
                make()
            except Exception as exc:  # noqa: BLE001 - raised inside every unit that waited for it
                log.warning("listenloop batched %s failed: %s", kind, exc)
                failure = exc
            for key in keys:
                steps = waiting[key][0]
                try:
                    waiting[key][1] = steps.throw(failure) if failure is not None else next(steps)
                except StopIteration as done:
                    ended[key] = done.value
                    del waiting[key]
            return True

        while call(ENCODER_CALL, self.encode):
            pass
        call(DECODER_STEP, self.step)
        return ended

    def step(self) -> None:
        """One decoder call for every slot that staged rows; none are staged afterwards."""
        with self._lock:
            try:
                if self._staging is None:
                    self._binder.run()
                else:
                    self._staging.before()
                    self._binder.run()
                    self._staging.after()
            finally:
                self.new_lengths[:] = 0


class _DeviceStaging:
    """The slot decoder's inputs and logits in device memory, for a captured CUDA graph (which
    reads and writes fixed device addresses): the host staging is copied in before each step
    and the logits copied back after it."""

    def __init__(self, pool: SlotPool, device: str):
        import onnxruntime as ort

        self._pool = pool
        self._names = ("inputs_embeds", "past_lengths", "new_lengths", "logits_index")
        self._host = (pool.embeds, pool.past_lengths, pool.new_lengths, pool.logits_index)
        self._values = [ort.OrtValue.ortvalue_from_numpy(array, device, 0) for array in self._host]
        self.logits = ort.OrtValue.ortvalue_from_numpy(pool.logits, device, 0)

    def bind(self, binder) -> None:
        for name, value in zip(self._names, self._values):
            binder.io.bind_ortvalue_input(name, value)
        binder.io.bind_ortvalue_output("logits", self.logits)

    def before(self) -> None:
        for value, array in zip(self._values, self._host):
            value.update_inplace(array)

    def after(self) -> None:
        self._pool.logits[...] = self.logits.numpy()  # OrtValue offers no copy into an existing array


class SlotCache:
    """One stream's slot in a SlotPool (the interface of kv_cache.py)."""

    def __init__(self, pool: SlotPool, stream):
        self._pool, self._stream = pool, weakref.proxy(stream)  # the stream owns its cache: no cycle
        self.slot, self._generation = pool.acquire()
        # the slot goes back when the stream is closed or dropped, whichever comes first
        self._release = weakref.finalize(self, pool.release, self.slot, self._generation)

    @property
    def nbytes(self) -> int:
        return self._pool.bytes_per_slot

    @property
    def array(self):
        """This slot's buffers [2 * layers, KVH, C + 13, D] (a view), or None on a device."""
        return None if self._pool.array is None else self._pool.array[:, self.slot]

    def encode_steps(self, mel: np.ndarray):
        """Stage the chunk in this slot's encoder row, yield for the shared encoder call, and
        return the chunk's audio vectors."""
        self._pool.stage_chunk(self.slot, self._generation, mel)
        yield ENCODER_CALL
        return self._pool.chunks.vectors(self.slot)

    def run(self, T: int):
        """Stage the stream's T tokens 13 rows at a time, yielding after each for the step."""
        pool, stream = self._pool, self._stream
        P, row = stream._position, int(stream._logits_index[0])
        for start in range(0, T, STEP):
            stop = min(start + STEP, T)
            pool.stage(self.slot, self._generation, stream._embeds[start:stop], P + start,
                       row - start if start <= row < stop else 0)
            yield DECODER_STEP
        stream._logits[0] = pool.logits[self.slot]  # the pool's row is rewritten by the next step

    def drive(self, steps):
        return drive(steps, self._pool.make)

    def clear(self) -> None:
        self._pool.clear(self.slot, self._generation)

    def close(self) -> None:
        self._release()
