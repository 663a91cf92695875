"""Model package loading and validation (format: runtime/PACKAGE_FORMAT.md, docs/DESIGN.md).

`load_package` checks the manifest, the files and the tokenizer without creating ONNX Runtime
sessions; `check_graphs` checks live sessions against the manifest once the engine has created
them. Every failure is one ModelPackageError line naming the file (with its folder) and the
field, e.g. `pkg/manifest.json: sampling.speak_bias: must be a finite number in [-100, 100],
got nan`. Every number in the manifest must be finite and inside the range given for it in
runtime/PACKAGE_FORMAT.md ("Ranges").
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .context import MAX_POSITIONS
from .errors import Bounds, ModelPackageError, show
from .protocol import EMOTION_NAMES, PRECISIONS, TOKEN_NAMES  # noqa: F401 - public here too
from .protocol import (CHUNK_SAMPLES, DYNAMIC_RANGE_LOG10, FRAMES_PER_CHUNK, HOP, LOG_FLOOR, N_FFT, N_MELS,
                       SAMPLE_RATE, STEP, VECTORS_PER_CHUNK)
from .sampling import REPLY_TOKENS, TEMPERATURE, TOP_P

FORMAT = "listenloop-model-package"
FORMAT_VERSION = 2
# Version 1 packages have no decoder.attention; their graph has the `grouped` contract (the same
# inputs and outputs) with the older, slower attention, and they load with one warning line.
READABLE_VERSIONS = (1, 2)
# docs/DESIGN.md, "Decoder graph contract": `grouped` binds a prefix of a position-major cache,
# `gqa` binds a whole head-major buffer as past and present (GroupQueryAttention).
ATTENTIONS = ("grouped", "gqa")
# The optional slot decoder (docs/DESIGN.md, "Fixed-slot batching"): S streams' steps of STEP
# rows in one call, in its own file beside decoder.onnx, at a precision whose kernels keep
# every row to itself (int8's per-call activation scale would not; int4's MatMulNBits does).
SLOT_DECODER_FILE = "decoder_slots.onnx"
SLOT_PRECISIONS = ("fp32", "fp16", "int4")
MANIFEST = "manifest.json"
IO_DTYPES = ("float32", "float16")
# The decoder's activation, embedding and KV dtype by precision: int8 quantizes float32
# activations per call; int4 (MatMulNBits) also takes float16 ones, what GPUs want.
IO_DTYPES_OF = {"fp32": ("float32",), "fp16": ("float16",), "int8": ("float32",), "int4": ("float32", "float16")}
MAX_FILE_NAME = 255
MAX_REPLY_SET = 10_000  # listed replies a package may carry (its prefix tree is built at load)
# sha256 of a file is checked at every load up to this size (measured: 1.3 GB/s here, so a few
# ms per MiB); bigger files, a real package's graphs and embeddings (GBs: seconds), only by
# `listenloop verify` (verify_package), and by their byte size at load.
HASH_AT_LOAD_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK = 8 << 20

# Ranges of the manifest's numbers (runtime/PACKAGE_FORMAT.md, "Ranges").
# A package's speak bias is a calibration (docs/PROTOCOL.md, "Sampling"): +-50 already decides
# every chunk, so anything past +-100 is a broken manifest rather than a choice.
PACKAGE_SPEAK_BIAS = Bounds(-100.0, 100.0)
CONTEXT = Bounds(1, MAX_POSITIONS, integer=True)
_AUDIO_FIELDS = {
    "sample_rate": int, "chunk_samples": int, "n_fft": int, "hop_length": int, "n_mels": int,
    "frames_per_chunk": int, "vectors_per_chunk": int, "mel_scale": str, "mel_norm": str,
    "log_floor": Bounds(0.0, 1.0, low_open=True, high_open=True),  # power floor before log10
    "dynamic_range_log10": Bounds(0.0, 20.0, low_open=True),  # up to 200 dB
}
# The manifest's audio section: the front end of docs/PROTOCOL.md ("Chunks", "Log-mel"), which
# the exporter writes as it is.
AUDIO = {
    "sample_rate": SAMPLE_RATE, "chunk_samples": CHUNK_SAMPLES, "n_fft": N_FFT, "hop_length": HOP,
    "n_mels": N_MELS, "frames_per_chunk": FRAMES_PER_CHUNK, "vectors_per_chunk": VECTORS_PER_CHUNK,
    "mel_scale": "slaney", "mel_norm": "slaney", "log_floor": LOG_FLOOR, "dynamic_range_log10": DYNAMIC_RANGE_LOG10,
}
# The runtime's front end (listenloop._core) is built for exactly these values; the log floor
# and the dynamic range only have to lie in their ranges.
_AUDIO_FIXED = {k: v for k, v in AUDIO.items() if k not in ("log_floor", "dynamic_range_log10")}
_DECODER_FIELDS = {
    "file": str, "precision": str, "io_dtype": str,
    "hidden_size": Bounds(1, 65536, integer=True), "num_layers": Bounds(1, 1024, integer=True),
    "num_heads": Bounds(1, 1024, integer=True), "num_kv_heads": Bounds(1, 1024, integer=True),
    "head_dim": Bounds(1, 4096, integer=True), "vocab_size": Bounds(1, 2 ** 24, integer=True),
    "rope_theta": Bounds(1.0, 1e10, low_open=True), "rms_norm_eps": Bounds(0.0, 0.1, low_open=True),
    "rope_position_rounding": str, "max_context": CONTEXT,
}
_QUANTIZATION_OPTIONAL = {"block_size": Bounds(1, 65536, integer=True), "accuracy_level": Bounds(0, 4, integer=True)}
_SAMPLING_FIELDS = {
    "temperature": TEMPERATURE, "top_k": int, "top_p": TOP_P, "speak_bias": PACKAGE_SPEAK_BIAS,
    "max_reply_tokens": REPLY_TOKENS,
}


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package folder."""

    path: Path
    manifest: dict
    tokens: dict  # name -> id
    emotions: dict  # name -> id
    prefix_ids: tuple
    encoder_path: Path
    decoder_path: Path
    embeddings_path: Path
    tokenizer_path: Path
    reply_set: tuple = ()  # the listed replies (emotion, text, TEXT_END ids); empty: free text
    slot_decoder_path: Path | None = None  # the slot decoder, when the package has one

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def decoder(self) -> dict:
        return self.manifest["decoder"]

    @property
    def hidden_size(self) -> int:
        return self.manifest["decoder"]["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["decoder"]["vocab_size"]

    @property
    def io_dtype(self) -> np.dtype:
        return np.dtype(self.manifest["decoder"]["io_dtype"])

    @property
    def attention(self) -> str:
        """The decoder graph's attention contract: "grouped" or "gqa" (version 1: "grouped")."""
        return self.manifest["decoder"].get("attention", "grouped")

    def embeddings(self) -> np.ndarray:
        """The [V, H] embedding table, memory-mapped read-only."""
        return np.load(self.embeddings_path, mmap_mode="r")


class _Invalid(ModelPackageError):
    """One problem found while checking a package: the file inside the package, the field and
    what is wrong. load_package and check_graphs turn it into a ModelPackageError whose
    message starts with the file's full path."""

    def __init__(self, file: str, field: str | None, problem: str):
        super().__init__(f"{file}: {field}: {problem}" if field else f"{file}: {problem}")
        self.file, self.field, self.problem = file, field, problem

    def at(self, root: Path) -> ModelPackageError:
        where = root / self.file
        return ModelPackageError(f"{where}: {self.field}: {self.problem}" if self.field else f"{where}: {self.problem}")


def _fail(file: str, field: str | None, problem: str) -> _Invalid:
    return _Invalid(file, field, problem)


def _type_name(expected) -> str:
    if isinstance(expected, Bounds):
        return expected.wants
    return {int: "an integer", str: "a string", dict: "an object", list: "a list"}[expected]


def _get(obj: dict, key: str, expected, where: str, file: str = MANIFEST) -> Any:
    """obj[key], checked: `expected` is a type (str, int, dict, list) or a Bounds."""
    field = f"{where}.{key}" if where else key
    if key not in obj:
        raise _fail(file, field, "missing")
    value = obj[key]
    if isinstance(expected, Bounds):
        problem = expected.problem(value)
        if problem:
            raise _fail(file, field, problem)
    elif isinstance(value, bool) or not isinstance(value, expected):
        raise _fail(file, field, f"must be {_type_name(expected)}, got {_json_show(value)}")
    return value


def _json_show(value) -> str:
    if isinstance(value, float) and not np.isfinite(value):
        return show(value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return show(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_section(manifest: dict, section: str, fields: dict) -> dict:
    obj = _get(manifest, section, dict, "")
    for key, expected in fields.items():
        _get(obj, key, expected, section)
    return obj


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise _fail(MANIFEST, None, "not found (not a model package folder?)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise _fail(MANIFEST, None, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise _fail(MANIFEST, None, "not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise _fail(MANIFEST, None, "not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer with too many digits
        raise _fail(MANIFEST, None, f"not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(manifest, dict):
        raise _fail(MANIFEST, None, "must hold a JSON object")
    return manifest


def _validate_header(manifest: dict) -> None:
    if _get(manifest, "format", str, "") != FORMAT:
        raise _fail(MANIFEST, "format", f"must be {FORMAT!r}, got {show(manifest['format'])}")
    version = _get(manifest, "format_version", int, "")
    if version not in READABLE_VERSIONS:
        raise _fail(MANIFEST, "format_version", f"this runtime reads versions {READABLE_VERSIONS[0]} to "
                    f"{READABLE_VERSIONS[-1]}, got {show(version)}; re-export the package with `listenloop export`")
    _get(manifest, "name", str, "")
    _get(manifest, "created_by", str, "")


def _validate_audio(manifest: dict) -> None:
    audio = _check_section(manifest, "audio", _AUDIO_FIELDS)
    for key, value in _AUDIO_FIXED.items():
        if audio[key] != value:
            raise _fail(MANIFEST, f"audio.{key}", f"this runtime supports only {value!r}, got {show(audio[key])}")


def _validate_decoder(manifest: dict) -> None:
    dec = _check_section(manifest, "decoder", _DECODER_FIELDS)
    if dec["precision"] not in PRECISIONS:
        raise _fail(MANIFEST, "decoder.precision", f"must be one of {PRECISIONS}, got {show(dec['precision'])}")
    if dec["io_dtype"] not in IO_DTYPES:
        raise _fail(MANIFEST, "decoder.io_dtype", f"must be one of {IO_DTYPES}, got {show(dec['io_dtype'])}")
    if dec["io_dtype"] not in IO_DTYPES_OF[dec["precision"]]:
        raise _fail(MANIFEST, "decoder.io_dtype", f"{dec['io_dtype']} does not go with precision {dec['precision']}")
    if dec["num_heads"] % dec["num_kv_heads"]:
        raise _fail(MANIFEST, "decoder.num_kv_heads", "must divide decoder.num_heads")
    if "trained_context" in dec:
        _get(dec, "trained_context", CONTEXT, "decoder")
    if manifest["format_version"] >= 2:
        attention = _get(dec, "attention", str, "decoder")
        if attention not in ATTENTIONS:
            raise _fail(MANIFEST, "decoder.attention", f"must be one of {ATTENTIONS}, got {show(attention)}")
    elif "attention" in dec:
        raise _fail(MANIFEST, "decoder.attention", "is a format_version 2 field (this manifest says 1)")
    if "quantization" not in dec:
        raise _fail(MANIFEST, "decoder.quantization", "missing (null for fp32/fp16)")
    quant = dec["quantization"]
    if dec["precision"] in ("fp32", "fp16"):
        if quant is not None:
            raise _fail(MANIFEST, "decoder.quantization", f"must be null for {dec['precision']}")
    else:
        if not isinstance(quant, dict):
            raise _fail(MANIFEST, "decoder.quantization", f"must be an object for {dec['precision']}")
        _get(quant, "method", str, "decoder.quantization")
        bits = _get(quant, "bits", int, "decoder.quantization")
        if bits != int(dec["precision"][3:]):
            raise _fail(MANIFEST, "decoder.quantization.bits", f"{bits} does not match precision {dec['precision']}")
        for key, bounds in _QUANTIZATION_OPTIONAL.items():
            if key in quant:
                _get(quant, key, bounds, "decoder.quantization")
    enc = _check_section(manifest, "encoder", {"file": str, "precision": str, "output_dim": int})
    if enc["precision"] not in PRECISIONS:
        raise _fail(MANIFEST, "encoder.precision", f"must be one of {PRECISIONS}, got {show(enc['precision'])}")
    if enc["output_dim"] != dec["hidden_size"]:
        raise _fail(MANIFEST, "encoder.output_dim", f"{enc['output_dim']} != decoder.hidden_size {dec['hidden_size']}")


def _validate_slot_decoder(manifest: dict) -> None:
    if "slot_decoder" not in manifest:
        return
    section = _check_section(manifest, "slot_decoder", {"file": str, "step_tokens": int})
    if section["step_tokens"] != STEP:
        raise _fail(MANIFEST, "slot_decoder.step_tokens", f"this runtime's listening step has {STEP} tokens, "
                                                          f"got {show(section['step_tokens'])}")
    for part in ("decoder", "encoder"):  # with slots, the encoder batches the slots' chunks too
        if manifest[part]["precision"] not in SLOT_PRECISIONS:
            raise _fail(MANIFEST, "slot_decoder", f"needs the {part} at one of {', '.join(SLOT_PRECISIONS)}, "
                                                  f"this one is {manifest[part]['precision']}")


def _token_id(value, field: str, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(MANIFEST, field, f"must be an integer token id, got {_json_show(value)}")
    if not 0 <= value < vocab:
        raise _fail(MANIFEST, field, f"id {show(value)} is outside the vocabulary [0, {vocab})")
    return value


def _validate_tokens(manifest: dict) -> tuple[dict, dict, tuple]:
    vocab = manifest["decoder"]["vocab_size"]
    raw = _get(manifest, "tokens", dict, "")
    tokens = {}
    for name in TOKEN_NAMES:
        if name not in raw:
            raise _fail(MANIFEST, f"tokens.{name}", "missing")
        tokens[name] = _token_id(raw[name], f"tokens.{name}", vocab)
    decision = {tokens["KEEP_SILENCE"], tokens["TEXT_BEGIN"]}
    if len(decision) != 2:
        raise _fail(MANIFEST, "tokens.KEEP_SILENCE", "must differ from tokens.TEXT_BEGIN")
    if tokens["TEXT_END"] in decision:
        raise _fail(MANIFEST, "tokens.TEXT_END", "must differ from KEEP_SILENCE and TEXT_BEGIN")
    raw_emotions = _get(manifest, "emotions", dict, "")
    emotions = {name: _token_id(value, f"emotions.{name}", vocab) for name, value in raw_emotions.items()}
    if not emotions:
        raise _fail(MANIFEST, "emotions", "must name at least one emotion id")
    prompt = _get(manifest, "prompt", dict, "")
    _get(prompt, "system_prompt", str, "prompt")
    prefix = _get(prompt, "prefix_ids", list, "prompt")
    if not prefix:
        raise _fail(MANIFEST, "prompt.prefix_ids", "must not be empty")
    prefix_ids = tuple(_token_id(v, f"prompt.prefix_ids[{i}]", vocab) for i, v in enumerate(prefix))
    if manifest["decoder"]["max_context"] < len(prefix_ids) + STEP + 1:
        raise _fail(MANIFEST, "decoder.max_context",
                    f"{manifest['decoder']['max_context']} cannot hold the prefix and one listening step")
    return tokens, emotions, prefix_ids


def _validate_reply_set(manifest: dict, tokens: dict, emotions: dict) -> tuple:
    """The optional closed set of replies (docs/PROTOCOL.md, "Reply set"): each the tokens a
    reply decodes after TEXT_BEGIN, an emotion first and TEXT_END last (and nowhere else)."""
    if "reply_set" not in manifest:
        return ()
    raw = _get(manifest, "reply_set", list, "")
    if not 1 <= len(raw) <= MAX_REPLY_SET:
        raise _fail(MANIFEST, "reply_set", f"must list 1 to {MAX_REPLY_SET} replies, got {len(raw)}")
    vocab, end = manifest["decoder"]["vocab_size"], tokens["TEXT_END"]
    max_tokens = manifest["sampling"]["max_reply_tokens"]
    replies = []
    for i, reply in enumerate(raw):
        field = f"reply_set[{i}]"
        if not isinstance(reply, list) or not 2 <= len(reply) <= max_tokens:
            raise _fail(MANIFEST, field, f"must be a list of 2 to {max_tokens} (sampling.max_reply_tokens) token ids, "
                                         f"got {_json_show(reply)}")
        ids = tuple(_token_id(v, f"{field}[{k}]", vocab) for k, v in enumerate(reply))
        if ids[0] not in emotions.values():
            raise _fail(MANIFEST, f"{field}[0]", f"must be an emotion id, got {ids[0]}")
        if ids[-1] != end or end in ids[:-1]:
            raise _fail(MANIFEST, field, f"must end with TEXT_END ({end}), and only there")
        replies.append(ids)
    if len(set(replies)) != len(replies):
        raise _fail(MANIFEST, "reply_set", "lists a reply twice")
    return tuple(replies)


def _validate_sampling(manifest: dict) -> None:
    sampling = _check_section(manifest, "sampling", _SAMPLING_FIELDS)
    # top_k above the vocabulary would cut nothing: the range ends at vocab_size.
    _get(sampling, "top_k", Bounds(0, manifest["decoder"]["vocab_size"], integer=True), "sampling")


def _check_name(manifest_field: str, name: str) -> None:
    if (os.sep in name or "/" in name or "\\" in name or "\x00" in name or name in ("", ".", "..")
            or len(name.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME):
        raise _fail(MANIFEST, manifest_field, f"must be a file name inside the package, got {show(name)}")


def _check_file(root: Path, manifest: dict, field: str, name: str) -> Path:
    _check_name(field, name)
    path = root / name
    if not path.is_file():
        raise _fail(name, field, "file not found in the package folder")
    if path.resolve().parent != root.resolve():  # a symbolic link out of the folder
        raise _fail(name, field, f"links to {path.resolve()}, outside the package folder")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, name: str, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise _fail(name, f"files.{name}.sha256", f"manifest says {expected[:16]}..., file has {actual[:16]}... "
                                                  "(corrupt or replaced?)")


def _validate_files(root: Path, manifest: dict) -> dict:
    paths = {
        "encoder": _check_file(root, manifest, "encoder.file", manifest["encoder"]["file"]),
        "decoder": _check_file(root, manifest, "decoder.file", manifest["decoder"]["file"]),
    }
    emb = _get(manifest, "embeddings", dict, "")
    paths["embeddings"] = _check_file(root, manifest, "embeddings.file", _get(emb, "file", str, "embeddings"))
    tok = _get(manifest, "tokenizer", dict, "")
    paths["tokenizer"] = _check_file(root, manifest, "tokenizer.file", _get(tok, "file", str, "tokenizer"))
    graphs = [manifest["encoder"]["file"], manifest["decoder"]["file"]]
    if "slot_decoder" in manifest:
        graphs.append(manifest["slot_decoder"]["file"])
        paths["slot_decoder"] = _check_file(root, manifest, "slot_decoder.file", graphs[-1])
    files = _get(manifest, "files", dict, "")
    for name in graphs:
        if name not in files:
            raise _fail(MANIFEST, f"files.{name}", "missing")
    for name, entry in files.items():
        _check_name(f"files.{name}", name)
        if not isinstance(entry, dict):
            raise _fail(MANIFEST, f"files.{name}", "must be an object with 'bytes'")
        expected = _get(entry, "bytes", Bounds(0, 2 ** 63 - 1, integer=True), f"files.{name}")
        path = _check_file(root, manifest, f"files.{name}", name)
        actual = path.stat().st_size
        if actual != expected:
            raise _fail(name, f"files.{name}.bytes", f"manifest says {expected} bytes, file has {actual} (truncated or replaced?)")
        digest = entry.get("sha256")
        if digest is not None and (not isinstance(digest, str) or not _SHA256.fullmatch(digest)):
            raise _fail(MANIFEST, f"files.{name}.sha256", f"must be 64 lower-case hex digits, got {show(digest)}")
        if digest is not None and actual <= HASH_AT_LOAD_BYTES:
            _check_sha256(path, name, digest)
    return paths


def verify_package(path) -> list[tuple[str, int, str]]:
    """Load the package and check the sha256 of every file in its manifest, however big:
    [(file name, bytes, "ok" or "no checksum")]; a mismatch raises ModelPackageError."""
    package = load_package(path)
    checked = []
    for name, entry in package.manifest["files"].items():
        digest = entry.get("sha256")
        if digest is not None:
            try:
                _check_sha256(package.path / name, name, digest)
            except _Invalid as problem:
                raise problem.at(package.path) from None
        checked.append((name, entry["bytes"], "ok" if digest is not None else "no checksum"))
    return checked


def _validate_embeddings(path: Path, manifest: dict) -> None:
    emb = manifest["embeddings"]
    dtype = _get(emb, "dtype", str, "embeddings")
    shape = _get(emb, "shape", list, "embeddings")
    dec = manifest["decoder"]
    expected = [dec["vocab_size"], dec["hidden_size"]]
    if shape != expected or any(isinstance(v, bool) for v in shape):
        raise _fail(MANIFEST, "embeddings.shape",
                    f"{_json_show(shape)} != [decoder.vocab_size, decoder.hidden_size] = {expected}")
    if dtype != dec["io_dtype"]:
        raise _fail(MANIFEST, "embeddings.dtype", f"{show(dtype)} != decoder.io_dtype {dec['io_dtype']}")
    try:
        table = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise _fail(path.name, "embeddings.file", f"not a readable .npy array ({detail})") from None
    if not isinstance(table, np.ndarray):
        raise _fail(path.name, "embeddings.file", "not a .npy array")
    if list(table.shape) != expected:
        raise _fail(path.name, "embeddings.shape", f"array has shape {list(table.shape)}, manifest says {expected}")
    if table.dtype != np.dtype(dtype):
        raise _fail(path.name, "embeddings.dtype", f"array has dtype {table.dtype}, manifest says {dtype}")


def _validate_tokenizer(path: Path) -> None:
    """Parse the tokenizer now, so a broken one stops the load rather than the first reply.
    The parsed tokenizer is cached (textstream.TokenBytes), so the model does not parse it twice."""
    from .textstream import TokenBytes

    TokenBytes(path)  # a ModelPackageError naming the file and tokenizer.file if it is broken


def load_package(path) -> ModelPackage:
    """Validate the package folder at `path` and return it (no ONNX Runtime sessions made)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelPackageError(f"{root}: model package folder not found")
    try:
        manifest = _read_manifest(root)
        _validate_header(manifest)
        _validate_audio(manifest)
        _validate_decoder(manifest)
        _validate_slot_decoder(manifest)
        tokens, emotions, prefix_ids = _validate_tokens(manifest)
        _validate_sampling(manifest)
        reply_set = _validate_reply_set(manifest, tokens, emotions)
        paths = _validate_files(root, manifest)
        _validate_embeddings(paths["embeddings"], manifest)
        _validate_tokenizer(paths["tokenizer"])
    except _Invalid as problem:
        raise problem.at(root) from None
    if manifest["format_version"] < FORMAT_VERSION:
        logging.getLogger("listenloop").warning(
            "%s: format_version %d package: its decoder has the older attention graph, slower at long contexts; "
            "re-export it with `listenloop export` for format %d", root, manifest["format_version"], FORMAT_VERSION)
    return ModelPackage(
        path=root, manifest=manifest, tokens=tokens, emotions=emotions, prefix_ids=prefix_ids,
        encoder_path=paths["encoder"], decoder_path=paths["decoder"],
        embeddings_path=paths["embeddings"], tokenizer_path=paths["tokenizer"], reply_set=reply_set,
        slot_decoder_path=paths.get("slot_decoder"),
    )


# --- graph signatures --------------------------------------------------------------------

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)"}


def _expected_decoder_io(package: ModelPackage) -> tuple[dict, dict]:
    """name -> (ort type, shape with None for dynamic dims) for the decoder's inputs/outputs."""
    dec = package.decoder
    io = _ORT_TYPES[dec["io_dtype"]]
    h, kvh, d, v = dec["hidden_size"], dec["num_kv_heads"], dec["head_dim"], dec["vocab_size"]
    gqa = package.attention == "gqa"
    batch = None if gqa else 1
    inputs = {
        "inputs_embeds": (io, [batch, None, h]),
        "position_ids": (_ORT_TYPES["int64"], [batch, None]),
        "logits_index": (_ORT_TYPES["int64"], [None]),
    }
    if gqa:
        inputs["seqlens_k"] = (_ORT_TYPES["int32"], [None])
        inputs["total_sequence_length"] = (_ORT_TYPES["int32"], [])
    outputs = {"logits": (_ORT_TYPES["float32"], [None, v])}
    cache = [None, kvh, None, d] if gqa else [1, None, kvh, d]
    written = "present" if gqa else "new"
    for i in range(dec["num_layers"]):
        for kind in ("key", "value"):
            inputs[f"past_{kind}.{i}"] = (io, cache)
            outputs[f"{written}_{kind}.{i}"] = (io, cache)
    return inputs, outputs


def _expected_slot_io(package: ModelPackage) -> tuple[dict, dict]:
    """The slot decoder's inputs/outputs: S slots of STEP rows, caches [S, KVH, C + 13, D]."""
    dec = package.decoder
    io, i64 = _ORT_TYPES[dec["io_dtype"]], _ORT_TYPES["int64"]
    inputs = {"inputs_embeds": (io, [None, STEP, dec["hidden_size"]]), "past_lengths": (i64, [None]),
              "new_lengths": (i64, [None]), "logits_index": (i64, [None])}
    outputs = {"logits": (_ORT_TYPES["float32"], [None, dec["vocab_size"]])}
    cache = [None, dec["num_kv_heads"], None, dec["head_dim"]]
    for i in range(dec["num_layers"]):
        for kind in ("key", "value"):
            inputs[f"past_{kind}.{i}"] = (io, cache)
            outputs[f"present_{kind}.{i}"] = (io, cache)
    return inputs, outputs


def check_slot_graph(package: ModelPackage, session) -> None:
    """Check a live session of the slot decoder against the manifest."""
    try:
        name = package.slot_decoder_path.name
        inputs, outputs = _expected_slot_io(package)
        _compare(name, "input", session.get_inputs(), inputs)
        _compare(name, "output", session.get_outputs(), outputs)
    except _Invalid as problem:
        raise problem.at(package.path) from None


def _expected_encoder_io(package: ModelPackage) -> tuple[dict, dict]:
    audio = package.manifest["audio"]
    f32 = _ORT_TYPES["float32"]
    return (
        {"mel": (f32, [None, audio["n_mels"], audio["frames_per_chunk"]])},
        {"audio_embeds": (f32, [None, audio["vectors_per_chunk"], package.hidden_size])},
    )


def _compare(file: str, kind: str, actual_args, expected: dict) -> None:
    actual = {a.name: a for a in actual_args}
    for name in actual:
        if name not in expected:
            raise _fail(file, f"{kind} {name!r}", "not part of the graph contract")
    for name, (ort_type, shape) in expected.items():
        if name not in actual:
            raise _fail(file, f"{kind} {name!r}", "missing from the graph")
        arg = actual[name]
        if arg.type != ort_type:
            raise _fail(file, f"{kind} {name!r}", f"dtype {arg.type}, manifest implies {ort_type}")
        if len(arg.shape) != len(shape):
            raise _fail(file, f"{kind} {name!r}", f"rank {len(arg.shape)}, expected {len(shape)}")
        for axis, (got, want) in enumerate(zip(arg.shape, shape)):
            # Dynamic dims may carry a symbolic name; static ones must agree exactly.
            if want is not None and isinstance(got, int) and got != want:
                raise _fail(file, f"{kind} {name!r} dim {axis}", f"{got} in the graph, manifest implies {want}")


def check_graphs(package: ModelPackage, encoder_session, decoder_session) -> None:
    """Check live ONNX Runtime sessions against the manifest (names, dtypes, static dims); a
    `decoder_session` of None is not checked."""
    try:
        _check_graphs(package, encoder_session, decoder_session)
    except _Invalid as problem:
        raise problem.at(package.path) from None


def _check_graphs(package: ModelPackage, encoder_session, decoder_session) -> None:
    enc_in, enc_out = _expected_encoder_io(package)
    _compare(package.encoder_path.name, "input", encoder_session.get_inputs(), enc_in)
    _compare(package.encoder_path.name, "output", encoder_session.get_outputs(), enc_out)
    if decoder_session is None:  # the slot decoder runs instead (check_slot_graph)
        return
    dec_in, dec_out = _expected_decoder_io(package)
    _compare(package.decoder_path.name, "input", decoder_session.get_inputs(), dec_in)
    _compare(package.decoder_path.name, "output", decoder_session.get_outputs(), dec_out)


def default_package_path() -> Path:
    """Where the embedded default model lives (listenloop/runtime/models/default)."""
    import listenloop.runtime as runtime_data

    return Path(runtime_data.__file__).parent / "models" / "default"


def resolve_package(path=None) -> ModelPackage:
    """`path`, or the embedded default model when `path` is None."""
    if path is not None:
        return load_package(path)
    default = default_package_path()
    if not (default / MANIFEST).is_file():
        raise ModelPackageError(
            f"no model package given and no embedded default model at {default}; "
            "pass a package folder (export one with `listenloop export CHECKPOINT OUT`)"
        )
    return load_package(default)
