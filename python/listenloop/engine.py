"""The synchronous protocol core over ONNX Runtime (MODEL_SPEC §5, §8; docs/DESIGN.md).

One Engine holds the encoder and decoder sessions and one preallocated KV cache. The cache is
a `[1, C, KVH, D]` buffer per layer for keys and for values; each decoder call binds `past_*`
to its first P rows and `new_*` to rows P..P+T of the same buffer, so the graph writes new
keys in place and nothing is copied or reallocated per step.

Token layout (§5.3): the first step feeds `prefix + [AUDIO_BEGIN, PAD×10, ASSISTANT]`, later
ones `[previous token] + block`, where the previous token is KEEP_SILENCE or TEXT_END. The
listening decision is a two-way choice between KEEP_SILENCE and TEXT_BEGIN (§11.1).

Bounded context: before a step that would not fit (leaving room for a reply), the cache is
rebuilt from the prompt prefix and the last few chunks' audio, assuming KEEP_SILENCE after
each of them; the step's ListenResult reports it in `context_reset`.

Not thread-safe: one thread drives an Engine at a time.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import ModelPackageError, ProtocolError
from .package import ModelPackage, check_graphs, resolve_package
from .profiles import (CPU, Profile, cpu_fallback, load_profile, provider_arguments,
                       resolve_providers, session_options)
from .sampling import Sampler, SamplingConfig

log = logging.getLogger("listenloop")

BLOCK_AUDIO = 10  # PAD rows in a listening block
BLOCK = BLOCK_AUDIO + 2  # AUDIO_BEGIN, PAD×10, ASSISTANT
STEP = BLOCK + 1  # fed-back token + block
_ONNX_FLOAT, _ONNX_INT64, _ONNX_FLOAT16 = 1, 7, 10  # onnx.TensorProto element types
MAX_CATCH_UP = 16  # chunks decided per decoder call in listen_many (bounds the logits staging)


class ListenResult:
    """One listening decision. `logits` is a view valid until the engine's next call."""

    __slots__ = ("spoke", "p_speak", "logits", "position", "context_reset", "_ids")

    def __init__(self, spoke: bool, p_speak: float, logits: np.ndarray, position: int,
                 context_reset: str | None, decision_ids: tuple):
        self.spoke = spoke
        self.p_speak = p_speak  # softmax over the two decision logits, speak_bias included
        self.logits = logits  # float32[V] at the ASSISTANT position
        self.position = position  # tokens in the cache after this step
        self.context_reset = context_reset  # why the cache was rebuilt before this step, if it was
        self._ids = decision_ids

    @property
    def decision_logits(self) -> np.ndarray:
        """float32[2]: KEEP_SILENCE, TEXT_BEGIN logits (speak_bias not added)."""
        return self.logits[list(self._ids)].astype(np.float32)

    def __repr__(self) -> str:
        return (f"ListenResult(spoke={self.spoke}, p_speak={self.p_speak:.4f}, position={self.position}, "
                f"context_reset={self.context_reset!r})")


@dataclass
class SpeakStep:
    """One reply token. `logits` is a view valid until the engine's next call."""

    token: int
    logits: np.ndarray


class _Binder:
    """IOBinding calls with the device objects made once.

    The public IOBinding methods build an OrtDevice on every call, which costs more than the
    bind itself at 4 bindings per layer per step; the C-level binding takes it prebuilt.
    Falls back to the public API if this onnxruntime lays its wrapper out differently.
    """

    def __init__(self, session):
        self.io = session.io_binding()
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
        # run() is the pre-bound session call, one Python frame less per step.
        if self.fast:
            self.bind_input, self.bind_output = self._c_io.bind_input, self._c_io.bind_output
            self.run = functools.partial(self._c_sess.run_with_iobinding, self._c_io, None)
        else:
            io = self.io
            self.bind_input = lambda name, device, dtype, shape, ptr: io.bind_input(name, device, 0, dtype, shape, ptr)
            self.bind_output = lambda name, device, dtype, shape, ptr: io.bind_output(name, device, 0, dtype, shape, ptr)
            self.run = functools.partial(session.run_with_iobinding, io)

    def device(self, kind: str):
        """The device argument of bind_input/bind_output for "cpu" or "cuda"."""
        return self._devices[kind] if self.fast else kind


def _allocate_host(nbytes: int) -> tuple[np.ndarray, object]:
    """Page-locked memory from listenloop._core when available, else plain aligned numpy."""
    try:
        from . import _core

        buf = _core.PinnedBuffer(nbytes)
        return np.frombuffer(buf, dtype=np.uint8, count=nbytes), buf
    except (ImportError, AttributeError):
        raw = np.zeros(nbytes + 64, dtype=np.uint8)
        offset = (-raw.ctypes.data) % 64
        return raw[offset:offset + nbytes], raw


class Engine:
    def __init__(self, package_or_path=None, profile="cpu", max_context: int | None = None, *,
                 sampling: SamplingConfig | None = None, sampler: Sampler | None = None,
                 speak_bias: float | None = None, speak_threshold: float | None = None,
                 max_reply_tokens: int | None = None, history_chunks: int | None = None):
        self.package = package_or_path if isinstance(package_or_path, ModelPackage) else resolve_package(package_or_path)
        pkg, dec = self.package, self.package.decoder
        manifest_sampling = pkg.manifest["sampling"]
        if sampler is None:
            sampling = sampling or SamplingConfig(temperature=manifest_sampling["temperature"],
                                                  top_k=manifest_sampling["top_k"], top_p=manifest_sampling["top_p"])
            sampler = Sampler(sampling)
        self.sampler = sampler
        self.speak_bias = float(manifest_sampling["speak_bias"] if speak_bias is None else speak_bias)
        self.speak_threshold = speak_threshold  # if set, speak when p_speak >= threshold (overrides sampling)
        self.max_reply_tokens = int(max_reply_tokens or manifest_sampling["max_reply_tokens"])

        self.profile = resolve_providers(load_profile(profile))
        self._create_sessions()

        self.tokens = pkg.tokens
        self._silence_id, self._speak_id = pkg.tokens["KEEP_SILENCE"], pkg.tokens["TEXT_BEGIN"]
        self._decision_ids = (self._silence_id, self._speak_id)
        self._audio_shape = (BLOCK_AUDIO, dec["hidden_size"])
        self._prefix = np.asarray(pkg.prefix_ids, dtype=np.int64)
        self.layers, self.kv_heads, self.head_dim = dec["num_layers"], dec["num_kv_heads"], dec["head_dim"]
        self.hidden, self.vocab = dec["hidden_size"], dec["vocab_size"]
        self.io_dtype = pkg.io_dtype
        # ONNX element type ids: binding with an int skips a NumPy dtype lookup per call
        self._io_type = _ONNX_FLOAT16 if self.io_dtype == np.float16 else _ONNX_FLOAT
        limits = [dec["max_context"], self.profile.max_context, max_context]
        self.capacity = min(c for c in limits if c is not None)
        minimum = len(self._prefix) + STEP + 1
        if self.capacity < minimum:
            raise ModelPackageError(f"context capacity {self.capacity} is too small: the prefix and one step need {minimum}")
        self.reply_reserve = min(self.max_reply_tokens + 1, self.capacity // 4)
        if history_chunks is None:  # re-prefilled history uses at most a quarter of the capacity
            history_chunks = max(0, (self.capacity // 4 - len(self._prefix) - STEP) // STEP)
        self.history_chunks = history_chunks

        self._table = pkg.embeddings()
        self._allocate()
        self.reset()

    # -- set-up --------------------------------------------------------------------------

    def _create_sessions(self) -> None:
        try:
            self._open_sessions(self.profile)
            self._self_test()
        except Exception as exc:  # noqa: BLE001 - any provider failure falls back to CPU
            if self.profile.primary == CPU:
                if isinstance(exc, ModelPackageError):
                    raise
                raise ModelPackageError(f"{self.package.path}: ONNX Runtime cannot run the graphs: {exc}") from None
            log.warning("profile %r: %s failed its start-up self-test (%s); running on CPUExecutionProvider",
                        self.profile.name, self.profile.primary, str(exc).splitlines()[0][:200])
            self.profile = cpu_fallback(self.profile)
            self._open_sessions(self.profile)
            self._self_test()

    def _open_sessions(self, profile: Profile) -> None:
        import onnxruntime as ort

        names, options = provider_arguments(profile)
        opts = session_options(profile)
        sessions = []
        for path in (self.package.encoder_path, self.package.decoder_path):
            try:
                sessions.append(ort.InferenceSession(str(path), sess_options=opts, providers=names, provider_options=options))
            except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
                if profile.primary != CPU:
                    raise
                raise ModelPackageError(f"{path.name}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0][:200]})") from None
        self.encoder, self.decoder = sessions
        check_graphs(self.package, self.encoder, self.decoder)
        self.providers = tuple(self.decoder.get_providers())

    def _self_test(self) -> None:
        """One real encoder call and one decoder call on zeros, on the chosen provider.

        The decoder call has the listening step's T. ONNX Runtime reuses the memory pattern
        of a session's first run for every later run whose input dims XOR to the same key; T
        and P cancel out of that key, so the first run's T decides which step length gets
        preplanned buffers. The 13-token step recurs every 0.4 s: on the tiny graph it is
        ~20 µs faster than after a 1-token self-test, 1-token reply steps ~10 µs slower.
        """
        audio = self.package.manifest["audio"]
        self.encoder.run(None, {"mel": np.zeros((1, audio["n_mels"], audio["frames_per_chunk"]), np.float32)})
        dec = self.package.decoder
        io = np.dtype(dec["io_dtype"])
        feeds = {"inputs_embeds": np.zeros((1, STEP, dec["hidden_size"]), io),
                 "position_ids": np.zeros((1, STEP), np.int64), "logits_index": np.zeros((1,), np.int64)}
        past = np.zeros((1, 1, dec["num_kv_heads"], dec["head_dim"]), io)
        for i in range(dec["num_layers"]):
            feeds[f"past_key.{i}"] = past
            feeds[f"past_value.{i}"] = past
        self.decoder.run(["logits"], feeds)

    def _allocate(self) -> None:
        """Every buffer a step touches, allocated once."""
        C, H = self.capacity, self.hidden
        row = self.kv_heads * self.head_dim
        self._row_bytes = row * self.io_dtype.itemsize
        self._kv_device = self.profile.kv_cache_device
        if self._kv_device == "cuda":
            import onnxruntime as ort

            self._kv_values = [ort.OrtValue.ortvalue_from_shape_and_type([1, C, self.kv_heads, self.head_dim], self.io_dtype, "cuda", 0)
                               for _ in range(2 * self.layers)]
            self._kv_ptrs = [v.data_ptr() for v in self._kv_values]
            self.kv_cache = None
        else:
            nbytes = 2 * self.layers * C * self._row_bytes
            raw, self._kv_owner = _allocate_host(nbytes)
            self.kv_cache = raw.view(self.io_dtype).reshape(2 * self.layers, 1, C, self.kv_heads, self.head_dim)
            self._kv_ptrs = [self.kv_cache[j].ctypes.data for j in range(2 * self.layers)]
        # Host staging (pinned when _core is present, so CUDA copies are async-capable).
        emb_raw, self._emb_owner = _allocate_host(C * H * self.io_dtype.itemsize)
        self._embeds = emb_raw.view(self.io_dtype).reshape(C, H)
        self._ids = np.zeros(C, np.int64)
        # position_ids are always P..P+T-1: each call binds that window of this array instead
        # of writing positions (a NumPy add per step cost several µs with cold caches)
        self._arange = np.arange(C, dtype=np.int64)
        self._arange_ptr = self._arange.ctypes.data
        self._logits_index = np.zeros(MAX_CATCH_UP, np.int64)
        self._logits = np.zeros((MAX_CATCH_UP, self.vocab), np.float32)
        self._logits_rows = list(self._logits)  # per-row views made once
        self._history = np.zeros((max(self.history_chunks, 1), BLOCK_AUDIO, H), self.io_dtype)
        self._history_rows = list(self._history)  # views made once: the ring is written every step
        self._step_audio = self._embeds[2:2 + BLOCK_AUDIO]  # the PAD rows of the steady step
        self._binder = _Binder(self.decoder)
        # bound methods and device objects looked up once, not per bind
        self._bind_in, self._bind_out = self._binder.bind_input, self._binder.bind_output
        self._cpu_dev, self._kv_dev = self._binder.device("cpu"), self._binder.device(self._kv_device)
        self._bound_shape = None  # (T, K) the staging inputs are bound with
        self._steady_staged = False  # staging holds the [KEEP_SILENCE] + block layout
        self._layer_bindings = [(f"past_key.{i}", f"new_key.{i}", f"past_value.{i}", f"new_value.{i}",
                                 self._kv_ptrs[2 * i], self._kv_ptrs[2 * i + 1]) for i in range(self.layers)]
        self._last = (0, 0, 0)  # (P, T, K) of the last decoder call, for inspection

    # -- public state --------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    @property
    def speaking(self) -> bool:
        return self._speaking

    def reset(self) -> None:
        """Empty the KV cache; the next listen feeds the prompt prefix first."""
        self._position = 0
        self._previous = None  # token to feed before the next block; None on the first step
        self._speaking = False
        self._history_count = 0
        self._history_next = 0
        self.reply_truncated = False

    def last_inputs(self) -> dict:
        """What the last decoder call was fed (views into the staging; for tests and debugging)."""
        P, T, K = self._last
        return {"past_length": P, "token_ids": self._ids[:T], "positions": self._arange[P:P + T],
                "inputs_embeds": self._embeds[:T], "logits_index": self._logits_index[:K]}

    # -- encoder -------------------------------------------------------------------------

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """[B,128,40] float32 mel -> [B,10,H] float32 audio vectors (chunks are independent)."""
        mel = np.asarray(mel)
        if mel.ndim == 2:
            mel = mel[None]
        audio = self.package.manifest["audio"]
        if mel.ndim != 3 or mel.shape[1:] != (audio["n_mels"], audio["frames_per_chunk"]):
            raise ValueError(f"mel must be [B, {audio['n_mels']}, {audio['frames_per_chunk']}], got {list(mel.shape)}")
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        return self.encoder.run(["audio_embeds"], {"mel": mel})[0]

    # -- decoder calls -------------------------------------------------------------------

    def _run(self, T: int, K: int) -> None:
        """Run the decoder on the staged T tokens, appending them to the cache at P."""
        P = self._position
        bind_in, bind_out, cpu, dtype = self._bind_in, self._bind_out, self._cpu_dev, self._io_type
        if self._bound_shape != (T, K):  # staging pointers never change; only shapes do
            bind_in("inputs_embeds", cpu, dtype, [1, T, self.hidden], self._embeds.ctypes.data)
            bind_in("logits_index", cpu, _ONNX_INT64, [K], self._logits_index.ctypes.data)
            bind_out("logits", cpu, _ONNX_FLOAT, [K, self.vocab], self._logits.ctypes.data)
            self._bound_shape = (T, K)
        bind_in("position_ids", cpu, _ONNX_INT64, [1, T], self._arange_ptr + 8 * P)  # int64 P..P+T-1
        past_shape, new_shape = [1, P, self.kv_heads, self.head_dim], [1, T, self.kv_heads, self.head_dim]
        offset, dev = P * self._row_bytes, self._kv_dev
        for pk, nk, pv, nv, kp, vp in self._layer_bindings:  # most of the per-step overhead
            bind_in(pk, dev, dtype, past_shape, kp)
            bind_out(nk, dev, dtype, new_shape, kp + offset)
            bind_in(pv, dev, dtype, past_shape, vp)
            bind_out(nv, dev, dtype, new_shape, vp + offset)
        self._binder.run()
        self._last = (P, T, K)
        self._position = P + T

    def _stage_tokens(self, start: int, ids) -> int:
        n = len(ids)
        self._ids[start:start + n] = ids
        return start + n

    def _stage_block(self, start: int, audio: np.ndarray) -> int:
        """AUDIO_BEGIN, PAD×10, ASSISTANT at `start`; returns the index after ASSISTANT."""
        t = self.tokens
        self._ids[start] = t["AUDIO_BEGIN"]
        self._ids[start + 1:start + 1 + BLOCK_AUDIO] = t["PAD"]
        self._ids[start + BLOCK - 1] = t["ASSISTANT"]
        self._audio_rows.append((start + 1, audio))
        return start + BLOCK

    def _steady_step(self, audio: np.ndarray) -> None:
        """The common step, [KEEP_SILENCE] + block: its 13 token ids never change, so their
        embeddings stay staged between steps and only the audio rows and positions are written."""
        if not self._steady_staged:
            self._audio_rows = []
            self._stage_block(self._stage_tokens(0, [self._silence_id]), audio)
            self._gather(STEP)
            self._logits_index[0] = STEP - 1
            self._steady_staged = True
        else:
            self._step_audio[...] = audio
        self._run(STEP, 1)

    def _gather(self, T: int) -> None:
        """Embeddings of the staged ids, then audio vectors over the PAD rows (§4.2 step 2)."""
        self._steady_staged = False
        np.take(self._table, self._ids[:T], axis=0, out=self._embeds[:T])
        for row, audio in self._audio_rows:
            self._embeds[row:row + BLOCK_AUDIO] = audio

    def _remember(self, audio: np.ndarray) -> None:
        n, i = self.history_chunks, self._history_next
        if n:
            self._history_rows[i][...] = audio
            self._history_next = i + 1 if i + 1 < n else 0
            if self._history_count < n:
                self._history_count += 1

    def _lead(self) -> np.ndarray | list:
        return self._prefix if self._previous is None else [self._previous]

    def _fits(self, chunks: int) -> int:
        """How many of `chunks` listening blocks fit now, leaving room for a reply."""
        lead = len(self._lead())
        room = self.capacity - self._position - self.reply_reserve - lead - BLOCK
        if room < 0:
            return 0
        return min(chunks, 1 + room // STEP)

    def _rebuild_context(self) -> str:
        """Keep the prompt prefix, re-prefill the last N chunks assuming KEEP_SILENCE after each."""
        before = self._position
        n = self._history_count
        self._position = 0
        self._audio_rows = []
        end = self._stage_tokens(0, self._prefix)
        oldest = (self._history_next - n) % max(self.history_chunks, 1)
        for j in range(n):
            if j:
                end = self._stage_tokens(end, [self.tokens["KEEP_SILENCE"]])
            end = self._stage_block(end, self._history[(oldest + j) % self.history_chunks])
        self._logits_index[0] = end - 1
        self._gather(end)
        self._run(end, 1)
        self._previous = self.tokens["KEEP_SILENCE"] if n else None
        reason = (f"context full at {before} of {self.capacity} tokens: kept the prompt and "
                  f"re-prefilled the last {n} chunks")
        log.info(reason)
        return reason

    def _decision(self, row: np.ndarray) -> tuple[bool, float]:
        silence = row.item(self._silence_id)  # a Python float, without a NumPy scalar in between
        speak = row.item(self._speak_id) + self.speak_bias
        margin = speak - silence
        p_speak = 1.0 / (1.0 + math.exp(-margin)) if margin > -700 else 0.0  # softmax over the two
        if self.speak_threshold is not None:
            return p_speak >= self.speak_threshold, p_speak
        return self.sampler.decide(silence, speak), p_speak

    # -- listening -----------------------------------------------------------------------

    def listen(self, audio_embeds: np.ndarray) -> ListenResult:
        """One listening step for one chunk's [10, H] audio vectors."""
        if type(audio_embeds) is not np.ndarray or audio_embeds.shape != self._audio_shape:
            audio_embeds = np.asarray(audio_embeds)
            if audio_embeds.shape != self._audio_shape:
                raise ValueError(f"audio vectors must be [{BLOCK_AUDIO}, {self.hidden}], got {list(audio_embeds.shape)}")
        if self._previous != self._silence_id or self._position + STEP + self.reply_reserve > self.capacity:
            return self._listen((audio_embeds,))[0]  # first step, after a reply, or a context reset
        if self._speaking:
            raise ProtocolError("listen() during a reply: finish iterating speak() first")
        # The steady state, kept short: it runs every 0.4 s for the whole session.
        self._steady_step(audio_embeds)
        row = self._logits_rows[0]
        spoke, p_speak = self._decision(row)
        self._remember(audio_embeds)
        if spoke:
            self._speaking, self._previous = True, None
        return ListenResult(spoke, p_speak, row, self._position, None, self._decision_ids)

    def listen_many(self, audio_embeds: np.ndarray) -> list[ListenResult]:
        """Decide k queued chunks ([k, 10, H]) in one decoder call (catch-up, §8).

        Prefills all k blocks assuming KEEP_SILENCE between them and reads the decision at
        every ASSISTANT position. If chunk j decides TEXT_BEGIN the cache is cut right after
        it and only j+1 results are returned; the caller re-feeds the rest after the reply.
        Fewer than k results are also returned when the call would exceed the context or
        MAX_CATCH_UP. Exactly equivalent to k single `listen` steps.
        """
        audio_embeds = np.asarray(audio_embeds)
        if audio_embeds.ndim != 3 or len(audio_embeds) == 0 or audio_embeds.shape[1:] != (BLOCK_AUDIO, self.hidden):
            raise ValueError(f"audio vectors must be [k, {BLOCK_AUDIO}, {self.hidden}] with k >= 1, got {list(audio_embeds.shape)}")
        return self._listen(audio_embeds)

    def _listen(self, audio_embeds) -> list[ListenResult]:
        if self._speaking:
            raise ProtocolError("listen() during a reply: finish iterating speak() first")
        reset_reason = None
        k = self._fits(min(len(audio_embeds), MAX_CATCH_UP))
        if k == 0:
            reset_reason = self._rebuild_context()
            k = max(1, self._fits(min(len(audio_embeds), MAX_CATCH_UP)))
        start = self._position
        if k == 1 and self._previous == self._silence_id:
            self._steady_step(audio_embeds[0])
        else:
            self._audio_rows = []
            end = self._stage_tokens(0, self._lead())
            for j in range(k):
                if j:
                    end = self._stage_tokens(end, [self._silence_id])
                end = self._stage_block(end, audio_embeds[j])
                self._logits_index[j] = end - 1
            self._gather(end)
            self._run(end, k)
        results = []
        for j in range(k):
            row = self._logits_rows[j]
            spoke, p_speak = self._decision(row)
            self._remember(audio_embeds[j])
            position = start + int(self._logits_index[j]) + 1
            results.append(ListenResult(spoke, p_speak, row, position, reset_reason if j == 0 else None,
                                        self._decision_ids))
            if spoke:
                self._position = position  # truncate: later blocks assumed a silence that did not happen
                break
        self._speaking = results[-1].spoke
        self._previous = None if self._speaking else self.tokens["KEEP_SILENCE"]
        return results

    # -- speaking ------------------------------------------------------------------------

    def speak(self, max_tokens: int | None = None) -> Iterator[SpeakStep]:
        """Decode a reply after a TEXT_BEGIN decision until TEXT_END (yielded) or the cap.

        When the cap or the context capacity ends the reply early, or the caller stops
        iterating, TEXT_END is forced into the context: it becomes the fed-back first token of
        the next listening block, exactly as after a normal reply. `reply_truncated` says so.
        """
        if not self._speaking:
            raise ProtocolError("speak() needs a TEXT_BEGIN decision from listen() first")
        cap = self.max_reply_tokens if max_tokens is None else int(max_tokens)
        text_end = self.tokens["TEXT_END"]
        token = self.tokens["TEXT_BEGIN"]
        self.reply_truncated = True
        self._audio_rows = []
        try:
            for _ in range(cap):
                if self._position + 1 + STEP > self.capacity:
                    log.info("reply cut at the context capacity (%d tokens)", self.capacity)
                    break
                self._ids[0] = token
                self._logits_index[0] = 0
                self._gather(1)
                self._run(1, 1)
                token = self.sampler.sample(self._logits[0])
                if token == text_end:
                    self.reply_truncated = False
                yield SpeakStep(token, self._logits[0])
                if token == text_end:
                    break
        finally:
            self._speaking = False
            self._previous = text_end

    def __repr__(self) -> str:
        return (f"Engine({self.package.name!r}, providers={list(self.providers)}, "
                f"position={self._position}/{self.capacity})")

