"""Model: one loaded package, shared read-only by every stream (docs/DESIGN.md, "Model and streams").

A Model holds what never changes while streams run: the ONNX Runtime sessions of the encoder
and decoder, the embedding table, the tokenizer's byte table, the protocol ids and the device
profile. ONNX Runtime sessions may be run from several threads, and nothing here is written
after construction, so any number of DecoderStreams (stream.py) can share one Model.

When the profile sets `"slots"` and the package has a slot decoder, the decoder session is the
slot decoder and the Model also holds the SlotPool whose slots its streams take (slot_pool.py;
docs/DESIGN.md, "Fixed-slot batching"); the pool is the one thing streams share that changes.
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
from dataclasses import replace

import numpy as np

from .context import check_capacity
from .encoder import ChunkBatch, finite_vectors
from .errors import DeviceError, ModelPackageError
from .package import ModelPackage, check_graphs, check_slot_graph, resolve_package
from .profiles import CPU, Profile, cpu_fallback, load_profile, provider_arguments, resolve_providers, session_options
from .protocol import FRAMES_PER_CHUNK, N_MELS, STEP, VECTORS_PER_CHUNK
from .reply_set import ReplySet

log = logging.getLogger("listenloop")


class Model:
    def __init__(self, package=None, profile="cpu", *, max_context: int | None = None):
        self.package = package if isinstance(package, ModelPackage) else resolve_package(package)
        pkg, dec = self.package, self.package.decoder
        self.profile = resolve_providers(load_profile(profile))
        self.attention = pkg.attention
        self.layers, self.kv_heads, self.head_dim = dec["num_layers"], dec["num_kv_heads"], dec["head_dim"]
        self.hidden, self.vocab = dec["hidden_size"], dec["vocab_size"]
        self.slots = self._slot_count()
        self.cuda_graphs = self._cuda_graphs()
        self.encoder_graphs = self._encoder_graphs()
        self._encoder_graph_ids = itertools.count(1)
        self._single_chunk = None  # the ChunkBatch of one chunk, when the encoder is captured
        self._single_chunk_lock = threading.Lock()
        self._create_sessions()

        self.tokens = pkg.tokens
        self.emotions = pkg.emotions
        self.prefix_ids = np.asarray(pkg.prefix_ids, dtype=np.int64)
        self.io_dtype = pkg.io_dtype
        self.sampling_defaults = dict(pkg.manifest["sampling"])
        self.trained_context = int(dec.get("trained_context", dec["max_context"]))
        if max_context is None:
            max_context = min(c for c in (dec["max_context"], self.profile.max_context) if c is not None)
            what = "the package's max_context" if max_context == dec["max_context"] else f"profile {self.profile.name!r} max_context"
        else:
            what = "max_context"
        # One stream's KV cache must fit in the memory it is allocated from (host memory for a
        # CPU cache; a CUDA cache is left to the device's allocator).
        from . import profiles

        per_token = 2 * self.layers * self.kv_heads * self.head_dim * self.io_dtype.itemsize
        available = profiles.available_memory() if self.profile.kv_cache_device == "cpu" else None
        self.capacity = check_capacity(max_context, prefix_len=len(self.prefix_ids), package_context=dec["max_context"],
                                       trained_context=self.trained_context, what=what,
                                       kv_bytes_per_token=per_token, available_bytes=available)
        self.embeddings = pkg.embeddings()
        self.reply_set = ReplySet(pkg.reply_set) if pkg.reply_set else None  # None: free text
        self.slot_pool = None
        if self.slots:
            from .slot_pool import SlotPool

            if available is not None and self.slots * (self.capacity + STEP) * per_token > available:
                raise DeviceError(f"profile {self.profile.name!r}: {self.slots} slots of {self.capacity} tokens need "
                                  f"{self.slots * (self.capacity + STEP) * per_token / 1e9:.1f} GB of KV cache, "
                                  f"{available / 1e9:.1f} GB are available; lower \"slots\" or max_context")
            self.slot_pool = SlotPool(self, self.slots)

    # -- set-up --------------------------------------------------------------------------

    def _slot_count(self) -> int:
        """Slots of the shared KV cache (0: one stream per decoder call): the profile's `slots`
        when the package has a slot decoder; otherwise one warning line and 0."""
        wanted = self.profile.slots
        if not wanted:
            return 0
        if self.package.slot_decoder_path is None:
            log.warning("profile %r asks for %d slots, but this package has no slot decoder (export it with "
                        "`--slots`): running one stream per decoder call", self.profile.name, wanted)
            return 0
        return wanted

    def _cuda_graphs(self) -> bool:
        """Whether decoder steps are captured as CUDA graphs: the profile asks for it in the
        decoder's CUDA options (`enable_cuda_graph`), which only a gqa graph or the slot decoder
        can serve (fixed shapes per step kind). Otherwise the option is dropped with one warning
        line."""
        name, options = self.profile.providers_for("decoder")[0]
        if name != "CUDAExecutionProvider" or not options.get("enable_cuda_graph"):
            return False
        if (self.attention == "gqa" or self.slots) and self.profile.kv_cache_device == "cuda":
            return True
        log.warning("profile %r: CUDA graphs need a package exported with `--attention gqa` (or a slot decoder "
                    "and a profile with \"slots\") and the KV cache on the device; this package's decoder is %r: "
                    "running without them", self.profile.name, self.attention)
        self._drop_cuda_graph_option("decoder")
        return False

    def _drop_cuda_graph_option(self, graph: str) -> None:
        """The profile without `enable_cuda_graph` in `graph`'s first provider's options."""
        (name, options), *rest = self.profile.providers_for(graph)
        kept = ((name, {k: v for k, v in options.items() if k != "enable_cuda_graph"}), *rest)
        self.profile = replace(self.profile, graph_providers=dict(self.profile.graph_providers, **{graph: kept}))

    def _encoder_graphs(self) -> bool:
        """Whether encoder calls are captured as CUDA graphs: the profile asks for it in the
        encoder's CUDA options (`enable_cuda_graph`). Every captured call runs a ChunkBatch
        (encoder.py): one chunk, or a slot pool's S chunks."""
        name, options = self.profile.providers_for("encoder")[0]
        return name == "CUDAExecutionProvider" and bool(options.get("enable_cuda_graph"))

    def _drop_encoder_graphs(self, reason: str) -> None:
        log.warning("profile %r: the encoder cannot be captured as a CUDA graph (%s): running it without",
                    self.profile.name, reason)
        self._drop_cuda_graph_option("encoder")
        self.encoder_graphs = False

    def encoder_graph_id(self) -> int:
        """A CUDA graph id of the encoder session not given out before (one per ChunkBatch)."""
        return next(self._encoder_graph_ids)

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
            self.cuda_graphs, self.encoder_graphs, self.slots = False, False, 0
            self._single_chunk = None
            self._open_sessions(self.profile)
            self._self_test()

    def _open_sessions(self, profile: Profile) -> None:
        import onnxruntime as ort

        opts = session_options(profile)
        sessions = []
        # with slots the slot decoder is the decoder: the per-stream graph is not loaded (on a GPU
        # it would hold the weights a second time)
        decoder_path = self.package.slot_decoder_path if self.slots else self.package.decoder_path
        for graph, path in (("encoder", self.package.encoder_path), ("decoder", decoder_path)):
            def load():
                names, options = provider_arguments(self.profile, graph)
                return ort.InferenceSession(str(path), sess_options=opts, providers=names, provider_options=options)

            try:
                try:
                    sessions.append(load())
                except Exception as exc:  # noqa: BLE001 - ORT refuses a capture with nodes off the GPU
                    if graph != "encoder" or not self.encoder_graphs:
                        raise
                    self._drop_encoder_graphs(str(exc).splitlines()[0][:200])
                    sessions.append(load())
            except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
                if profile.primary != CPU:
                    raise
                raise ModelPackageError(f"{path.name}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0][:200]})") from None
        self.encoder, self.decoder = sessions
        if self.slots:
            check_graphs(self.package, self.encoder, None)
            check_slot_graph(self.package, self.decoder)
        else:
            check_graphs(self.package, self.encoder, self.decoder)
        self.providers = tuple(self.decoder.get_providers())

    def _self_test(self) -> None:
        """One real encoder call and one decoder call on zeros, on the chosen provider.

        The decoder call has the listening step's T. ONNX Runtime reuses the memory pattern
        of a session's first run for every later run whose input dims XOR to the same key; T
        and P cancel out of that key, so the first run's T decides which step length gets
        preplanned buffers. The 13-token step recurs every 0.4 s.
        """
        audio = self.encode(np.zeros((1, N_MELS, FRAMES_PER_CHUNK), np.float32), check=False)
        dec = self.package.decoder
        io = np.dtype(dec["io_dtype"])
        # the steady listening step's own tokens, so broken embedding rows fail here too
        t = self.package.tokens
        ids = [t["KEEP_SILENCE"], t["AUDIO_BEGIN"], *[t["PAD"]] * VECTORS_PER_CHUNK, t["ASSISTANT"]]
        embeds = np.array(self.package.embeddings()[ids], dtype=io)
        embeds[2:2 + VECTORS_PER_CHUNK] = audio[0].astype(io)
        if self.slots:  # one slot: a cached row, this step's 13 and the 13 scratch rows
            feeds = {"inputs_embeds": embeds[None], "past_lengths": np.array([1]), "new_lengths": np.array([STEP]),
                     "logits_index": np.array([STEP - 1])}
            past = np.zeros((1, dec["num_kv_heads"], 1 + 2 * STEP, dec["head_dim"]), io)
        else:
            feeds = {"inputs_embeds": embeds[None], "position_ids": np.arange(STEP, dtype=np.int64)[None] + 1,
                     "logits_index": np.zeros((1,), np.int64)}
            past = np.zeros((1, 1, dec["num_kv_heads"], dec["head_dim"]), io)
        if not self.slots and self.package.attention == "gqa":  # one cached row and this step's, in a buffer of that size
            feeds["seqlens_k"] = np.array([STEP], np.int32)
            feeds["total_sequence_length"] = np.array(STEP + 1, np.int32)
            past = np.zeros((1, dec["num_kv_heads"], STEP + 1, dec["head_dim"]), io)
        for i in range(dec["num_layers"]):
            feeds[f"past_key.{i}"] = past
            feeds[f"past_value.{i}"] = past
        options = None
        if self.cuda_graphs:  # not a step to capture
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", "-1")
        logits = self.decoder.run(["logits"], feeds, options)[0]
        for what, values, file in (("encoder", audio, self.package.encoder_path),
                                   ("decoder", logits, self.package.decoder_path)):
            if not np.isfinite(values).all():
                raise ModelPackageError(f"{file}: the start-up self-test gave NaN or infinite {what} outputs "
                                        "(broken weights or embeddings?)")

    # -- shared read-only services -------------------------------------------------------

    @functools.cached_property
    def token_bytes(self):
        """Byte strings of every token id, for streaming reply text (loaded on first use)."""
        from .textstream import TokenBytes

        return TokenBytes(self.package.tokenizer_path)

    @property
    def kv_bytes(self) -> int:
        """Memory of one stream's KV cache: what each additional stream costs."""
        return 2 * self.layers * self.capacity * self.kv_heads * self.head_dim * self.io_dtype.itemsize

    @property
    def kv_shape(self) -> tuple:
        """Shape of one layer's key (or value) buffer: position-major [1, C, KVH, D] for the
        grouped graph (a step binds its first P rows), head-major [1, KVH, C, D] for gqa (a
        step binds all of it) (docs/DESIGN.md, "Decoder graph contract")."""
        if self.attention == "gqa":
            return (1, self.kv_heads, self.capacity, self.head_dim)
        return (1, self.capacity, self.kv_heads, self.head_dim)

    def encode(self, mel: np.ndarray, *, check: bool = True) -> np.ndarray:
        """[B,128,40] float32 mel -> [B,10,H] float32 audio vectors (chunks are independent).
        With a captured encoder each chunk runs through the one-chunk ChunkBatch."""
        mel = np.asarray(mel)
        if mel.ndim == 2:
            mel = mel[None]
        if mel.ndim != 3 or mel.shape[1:] != (N_MELS, FRAMES_PER_CHUNK):
            raise ValueError(f"mel must be [B, {N_MELS}, {FRAMES_PER_CHUNK}], got {list(mel.shape)}")
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        if self.encoder_graphs:
            audio = np.empty((len(mel), VECTORS_PER_CHUNK, self.hidden), np.float32)
            with self._single_chunk_lock:  # one staging for every thread
                if self._single_chunk is None:
                    self._single_chunk = ChunkBatch(self, 1, self.encoder_graph_id())
                for i, chunk in enumerate(mel):
                    self._single_chunk.stage(0, chunk)
                    self._single_chunk.run()
                    audio[i] = self._single_chunk.audio[0]
        else:
            audio = self.encoder.run(["audio_embeds"], {"mel": mel})[0]
        return finite_vectors(audio) if check else audio

    def new_cache(self, stream):
        """The KV cache of a new stream (kv_cache.py): its slot in the pool when there is one
        (CapacityError when every slot is taken), else its own buffers."""
        if self.slot_pool is not None:
            from .slot_pool import SlotCache

            return SlotCache(self.slot_pool, stream)
        from .kv_cache import StreamBuffer

        return StreamBuffer(stream)

    def policy(self, **options):
        """A checked stream.Policy: the package's defaults with `options` over them."""
        from .stream import Policy

        return Policy.build(self.sampling_defaults, **options)

    def stream(self, policy=None, **options):
        """A new decoder stream over this model, with a Policy or Policy options."""
        from .stream import DecoderStream

        return DecoderStream(self, policy, **options)

    def __repr__(self) -> str:
        return f"Model({self.package.name!r}, providers={list(self.providers)}, capacity={self.capacity})"
