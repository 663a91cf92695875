"""A stream's KV cache: one interface, two implementations chosen by the device profile
(docs/DESIGN.md, "Model and streams", "Fixed-slot batching").

- `StreamBuffer` (this module): the stream's own buffers, one decoder call per step, run at once.
- `SlotCache` (slot_pool.py): the stream's slot in a `SlotPool` shared by S streams, whose one
  call runs a step of every slot that has work (profiles with `"slots"`).

What a DecoderStream asks of its cache, whichever it is:

- `run(T)`: an iterable (`yield from cache.run(T)`) that runs the decoder on the T tokens the
  stream staged (its `_embeds[:T]`, logits row `_logits_index[0]`) at the stream's position,
  and leaves that row's logits in the stream's `_logits[0]`. It yields each time it waits for
  a shared step (a StreamBuffer never does: it runs the call at once and returns `()`);
  whoever drives the stream makes that step and resumes it.
- `encode_steps(mel)`: an iterable that returns one chunk's audio vectors [10, H] from its
  normalised log-mel [128, 40]. A StreamBuffer encodes at once; a SlotCache stages the chunk
  in its pool's encoder batch and yields until the round's shared encoder call.
- `drive(steps)`: runs a generator of the stream's (`encode_steps`, `listen_steps`,
  `speak_steps`) to its end and returns its value, making any shared call itself: the plain
  `listen()` and `speak_step()`, for callers that drive one stream on their own.
- `clear()`: forget what the buffer holds (after NaN or infinite outputs).
- `close()`: give the memory back (a slot becomes free for another stream).
- `nbytes`, `array` (a host view of the buffers, or None when they live on a device).
"""
from __future__ import annotations

import functools
import weakref

import numpy as np

from .protocol import STEP

ONNX_FLOAT, ONNX_INT32, ONNX_INT64, ONNX_FLOAT16 = 1, 6, 7, 10  # onnx.TensorProto element types
# What a waiting stream yields: the shared call it waits for.
ENCODER_CALL, DECODER_STEP = "encoder call", "decoder step"
# CUDA graph id of each captured step kind (T) of a per-stream gqa graph: the listening step
# and the reply token.
_CAPTURED_STEPS = {STEP: 1, 1: 2}


def drive(steps, make_call=None):
    """Run the generator `steps` to its end and return its value; `make_call(what)` makes each
    shared call it waits for (ENCODER_CALL or DECODER_STEP; None: a cache that never waits). A
    failed call is raised inside the generator, where the model call would have raised, so the
    stream's state stays as it was before that call."""
    while True:
        try:
            waiting_for = next(steps)
        except StopIteration as done:
            return done.value
        if make_call is None:
            raise RuntimeError("a stream waited for a shared model call, but its cache makes none")
        try:
            make_call(waiting_for)
        except BaseException as exc:  # noqa: BLE001 - re-raised through the generator
            try:
                steps.throw(exc)
            except StopIteration as done:
                return done.value
            raise RuntimeError("a stream went on after its decoder step failed") from exc


class Binder:
    """IOBinding calls with the device objects made once.

    The public IOBinding methods build an OrtDevice on every call, which costs more than the
    bind itself at 4 bindings per layer per step; the C-level binding takes it prebuilt.
    Falls back to the public API if this onnxruntime lays its wrapper out differently.
    """

    def __init__(self, session, run_options=None):
        self.io = session.io_binding()
        self.bound_T = None  # the step length this binding's staging inputs are bound for
        self.staging = None  # a _GraphStaging when this step kind is captured as a CUDA graph
        self._c_io = getattr(self.io, "_iobinding", None)
        self._c_sess = getattr(session, "_sess", None)
        self._devices = {}
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            for kind in ("cpu", "cuda"):
                try:
                    self._devices[kind] = OrtDevice.make(kind, 0)._get_c_device()
                except Exception:  # noqa: BLE001 - a build without that device type
                    pass
        except ImportError:
            pass
        self.fast = self._c_io is not None and self._c_sess is not None and "cpu" in self._devices
        # bind_input/bind_output(name, device, element_type, shape, ptr), with `device` from
        # device(kind): the same signature on both paths, so the per-step loop has one form.
        if self.fast:
            self.bind_input, self.bind_output = self._c_io.bind_input, self._c_io.bind_output
            self.run = functools.partial(self._c_sess.run_with_iobinding, self._c_io, run_options)
        else:
            io = self.io
            self.bind_input = lambda name, device, dtype, shape, ptr: io.bind_input(name, device, 0, dtype, shape, ptr)
            self.bind_output = lambda name, device, dtype, shape, ptr: io.bind_output(name, device, 0, dtype, shape, ptr)
            self.run = functools.partial(session.run_with_iobinding, io, run_options)

    def device(self, kind: str):
        """The device argument of bind_input/bind_output for "cpu" or "cuda"."""
        return self._devices[kind] if self.fast else kind


class _GraphStaging:
    """Inputs and logits of one captured step kind in device memory (gqa graphs on CUDA with
    CUDA graphs): a replayed graph reads and writes fixed device addresses, so the host staging
    is copied into these buffers before each run and the logits copied back after it."""

    def __init__(self, stream, T: int, device: str):
        import onnxruntime as ort

        def on_device(array):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)

        self.embeds_host = stream._embeds[:T][None]
        self.positions_host = stream._positions[:T][None]
        self.embeds = on_device(self.embeds_host)
        self.positions = on_device(self.positions_host)
        self.seqlens = on_device(stream._seqlens)
        self.logits_index = on_device(np.array([T - 1], np.int64))  # fixed per kind: the last row
        self.logits = on_device(stream._logits)
        self._stream = stream

    def bind(self, binder) -> None:
        io = binder.io
        io.bind_ortvalue_input("inputs_embeds", self.embeds)
        io.bind_ortvalue_input("position_ids", self.positions)
        io.bind_ortvalue_input("logits_index", self.logits_index)
        io.bind_ortvalue_input("seqlens_k", self.seqlens)
        io.bind_ortvalue_output("logits", self.logits)

    def before(self) -> None:
        self.embeds.update_inplace(self.embeds_host)
        self.positions.update_inplace(self.positions_host)
        self.seqlens.update_inplace(self._stream._seqlens)

    def after(self) -> None:
        # OrtValue offers no copy into an existing host array: one [1, V] array per step.
        self._stream._logits[...] = self.logits.numpy()


def allocate_host(nbytes: int) -> tuple[np.ndarray, object]:
    """Page-locked memory from listenloop._core (async-capable CUDA copies), as a uint8 array."""
    from . import _core

    buf = _core.PinnedBuffer(nbytes)
    return np.frombuffer(buf, dtype=np.uint8, count=nbytes), buf


def pinned_zeros(shape, dtype, owners: list) -> np.ndarray:
    """Zeroed page-locked memory of `shape` and `dtype`; the memory's owner is appended to
    `owners`, which must outlive the array."""
    dtype = np.dtype(dtype)
    raw, owner = allocate_host(int(np.prod(shape)) * dtype.itemsize)
    owners.append(owner)
    array = raw.view(dtype).reshape(shape)
    array[...] = 0
    return array




class StreamBuffer:
    """One stream's own KV buffers, which the graph writes in place (docs/DESIGN.md, "Decoder
    graph contract"): each layer has one key and one value buffer of the stream's capacity C.

    With the `grouped` graph a buffer is position-major `[1, C, KVH, D]` and each call binds
    `past_*` to its first P rows and `new_*` to rows P..P+T. With the `gqa` graph it is
    head-major `[1, KVH, C, D]`, bound whole as both past and present; the listening step and
    the reply step each keep their own binding, so a step only writes positions and `seqlens_k`
    into staging that never moves (fixed shapes and addresses: what CUDA graphs capture).
    """

    def __init__(self, stream):
        m = stream.model
        self._stream = weakref.proxy(stream)  # the stream owns this cache: no cycle to wait for the GC
        self.model = m
        self.io_dtype = m.io_dtype
        self._io_type = ONNX_FLOAT16 if self.io_dtype == np.float16 else ONNX_FLOAT
        self._row_bytes = m.kv_heads * m.head_dim * self.io_dtype.itemsize
        self._kv_device = m.profile.kv_cache_device
        self._shared_cache = m.attention == "gqa"
        if self._kv_device == "cuda":
            import onnxruntime as ort

            self._kv_values = [ort.OrtValue.ortvalue_from_shape_and_type(list(m.kv_shape), self.io_dtype, "cuda", 0)
                               for _ in range(2 * m.layers)]
            kv_ptrs = [v.data_ptr() for v in self._kv_values]
            self.array = None
        else:
            raw, self._kv_owner = allocate_host(m.kv_bytes)
            self.array = raw.view(self.io_dtype).reshape(2 * m.layers, *m.kv_shape)
            kv_ptrs = [self.array[j].ctypes.data for j in range(2 * m.layers)]
        binder = self._binder = Binder(m.decoder)
        self._bind_in, self._bind_out = binder.bind_input, binder.bind_output
        self._cpu_dev, self._kv_dev = binder.device("cpu"), binder.device(self._kv_device)
        self._kv_ptrs = kv_ptrs
        self._layer_bindings = [(f"past_key.{i}", f"new_key.{i}", f"past_value.{i}", f"new_value.{i}",
                                 kv_ptrs[2 * i], kv_ptrs[2 * i + 1]) for i in range(m.layers)]
        # gqa: one binding per step kind (the listening step, a reply token), made on first use,
        # and one for every other length (prompt and re-prefill), rebound when its T changes.
        self._step_binders = {}
        self._graph_capture = m.cuda_graphs

    @property
    def nbytes(self) -> int:
        return self.model.kv_bytes

    def run(self, T: int) -> tuple:
        """The decoder call for the staged T tokens, made at once: nothing to wait for (an
        empty iterable, so `yield from` passes straight through without a generator object)."""
        if self._shared_cache:
            self._run_shared(T)
        else:
            self._run_prefix(T)
        return ()

    def encode_steps(self, mel: np.ndarray):
        """The chunk's audio vectors, encoded at once: a generator that never waits."""
        audio = self.model.encode(mel[None])[0]
        yield from ()
        return audio

    def drive(self, steps):
        return drive(steps)

    def clear(self) -> None:
        """Nothing to do: a step reads only the rows below the stream's position."""

    def close(self) -> None:
        """Nothing to do: the buffers go with the stream."""

    def _run_prefix(self, T: int) -> None:
        """grouped graph: past = the first P rows of each buffer, new = rows P..P+T."""
        s = self._stream
        P = s._position
        bind_in, bind_out, cpu, dtype = self._bind_in, self._bind_out, self._cpu_dev, self._io_type
        if self._binder.bound_T != T:  # staging pointers never change; only shapes do
            bind_in("inputs_embeds", cpu, dtype, [1, T, self.model.hidden], s._embeds.ctypes.data)
            bind_in("logits_index", cpu, ONNX_INT64, [1], s._logits_index.ctypes.data)
            bind_out("logits", cpu, ONNX_FLOAT, [1, self.model.vocab], s._logits.ctypes.data)
            self._binder.bound_T = T
        bind_in("position_ids", cpu, ONNX_INT64, [1, T], s._arange.ctypes.data + 8 * P)  # int64 P..P+T-1
        m = self.model
        past_shape, new_shape = [1, P, m.kv_heads, m.head_dim], [1, T, m.kv_heads, m.head_dim]
        offset, dev = P * self._row_bytes, self._kv_dev
        for pk, nk, pv, nv, kp, vp in self._layer_bindings:  # most of the per-step overhead
            bind_in(pk, dev, dtype, past_shape, kp)
            bind_out(nk, dev, dtype, new_shape, kp + offset)
            bind_in(pv, dev, dtype, past_shape, vp)
            bind_out(nv, dev, dtype, new_shape, vp + offset)
        self._binder.run()

    def _run_shared(self, T: int) -> None:
        """gqa graph: every buffer whole as past and present; the new rows go to P..P+T."""
        s = self._stream
        P = s._position
        np.add(s._arange[:T], P, out=s._positions[:T])
        s._seqlens[0] = P + T - 1
        binder = self._shared_binder(T)
        staging = binder.staging
        if staging is None:
            binder.run()
        else:
            staging.before()
            binder.run()
            staging.after()

    def _shared_binder(self, T: int) -> "Binder":
        """The binding of T's step kind. With CUDA graphs the listening step and the reply token
        are captured as graphs 1 and 2 (their shapes and addresses never change); other lengths
        run uncaptured (graph id -1)."""
        kind = T if T in _CAPTURED_STEPS else 0
        binder = self._step_binders.get(kind)
        if binder is None:
            options = None
            if self._graph_capture:
                import onnxruntime as ort

                options = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(_CAPTURED_STEPS.get(kind, -1)))
            binder = self._step_binders[kind] = Binder(self.model.decoder, options)
            binder.staging = _GraphStaging(self._stream, T, self._kv_device) if self._graph_capture and kind else None
        if binder.bound_T != T:
            self._bind_shared(binder, T)
            binder.bound_T = T
        return binder

    def _bind_shared(self, binder: "Binder", T: int) -> None:
        m, s, cpu, dtype = self.model, self._stream, binder.device("cpu"), self._io_type
        bind_in, bind_out = binder.bind_input, binder.bind_output
        if binder.staging is not None:  # a captured step kind reads and writes device staging
            binder.staging.bind(binder)
        else:
            bind_in("inputs_embeds", cpu, dtype, [1, T, m.hidden], s._embeds.ctypes.data)
            bind_in("position_ids", cpu, ONNX_INT64, [1, T], s._positions.ctypes.data)
            bind_in("logits_index", cpu, ONNX_INT64, [1], s._logits_index.ctypes.data)
            bind_in("seqlens_k", cpu, ONNX_INT32, [1], s._seqlens.ctypes.data)
            bind_out("logits", cpu, ONNX_FLOAT, [1, m.vocab], s._logits.ctypes.data)
        bind_in("total_sequence_length", cpu, ONNX_INT32, [], s._total.ctypes.data)  # a CPU input either way
        shape, dev = list(m.kv_shape), binder.device(self._kv_device)
        for i in range(m.layers):
            for j, kind in enumerate(("key", "value")):
                ptr = self._kv_ptrs[2 * i + j]
                bind_in(f"past_{kind}.{i}", dev, dtype, shape, ptr)
                bind_out(f"present_{kind}.{i}", dev, dtype, shape, ptr)
