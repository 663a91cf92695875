"""Checkpoint -> model package folder (docs/DESIGN.md "Model package").

The package is built in a temporary folder next to OUT_DIR and renamed into place only once
every file is written, so a failed export never leaves a half-written package behind.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from listenloop.errors import CheckpointError, ExportError
from listenloop.package import (ATTENTIONS, AUDIO, FORMAT, FORMAT_VERSION, IO_DTYPES_OF, SLOT_DECODER_FILE,
                                SLOT_PRECISIONS, file_sha256)
from listenloop.protocol import EMOTION_NAMES, FRAMES_PER_CHUNK, MAX_REPLY_TOKENS, N_MELS, PREFIX_HEAD, STEP, TOKEN_NAMES

from . import quantize
from .checkpoint import TRAINED_CONTEXT, validate_checkpoint

VERSION = "0.1.0"
SAMPLING = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "speak_bias": 0.0, "max_reply_tokens": MAX_REPLY_TOKENS}
ENCODER_TOLERANCE = 1e-4  # batched wrapper vs HF forward, fp32


def prefix_ids(tokens: dict, tokenizer, system_prompt: str) -> list:
    """The streaming prefix (docs/PROTOCOL.md, "Prompt"):
    [ONLINE, ENGLISH, SYSTEM, TEXT_BEGIN] + encode(system prompt) + [TEXT_END]."""
    from .tokenizer_build import encode_text

    return [tokens[name] for name in PREFIX_HEAD] + encode_text(tokenizer, system_prompt) + [tokens["TEXT_END"]]


def read_reply_set(path) -> list[tuple[str, str]]:
    """(emotion, text) pairs from a reply-set file: a JSON list of {"emotion": NAME, "text": TEXT}
    (docs/PROTOCOL.md, "Reply set")."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read the reply set: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ExportError(f"{path}: a reply set is a non-empty JSON list of {{\"emotion\", \"text\"}} objects")
    replies = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"emotion", "text"}:
            raise ExportError(f"{path}: reply {i}: must be an object with exactly the keys emotion and text")
        emotion, text = entry["emotion"], entry["text"]
        if emotion not in EMOTION_NAMES:
            raise ExportError(f"{path}: reply {i}: emotion {emotion!r} is not one of {', '.join(EMOTION_NAMES)}")
        if not isinstance(text, str) or not text.strip():
            raise ExportError(f"{path}: reply {i}: text must be a non-empty string")
        replies.append((emotion, text))
    return replies


def reply_set_ids(replies, tokens: dict, tokenizer) -> list:
    """Each reply as the tokens decoded after TEXT_BEGIN: emotion, text, TEXT_END."""
    from .tokenizer_build import encode_text

    return [[tokens[emotion], *encode_text(tokenizer, text), tokens["TEXT_END"]] for emotion, text in replies]


def _parameter_counts(llm: dict, audio) -> tuple[int, int]:
    h, ff, v = llm["n_embd"], llm["intermediate_size"], llm["padded_vocab_size"]
    qkv = (llm["n_head"] + 2 * llm["n_query_groups"]) * llm["head_size"]
    layer = qkv * (h + 1) + llm["n_head"] * llm["head_size"] * h + 3 * ff * h + 2 * h
    lm = llm["n_layer"] * layer + 2 * v * h + h
    d, eff = audio.d_model, audio.encoder_ffn_dim
    enc = audio.encoder_layers * (4 * d * d + 2 * d * eff + 10 * d) + N_MELS * d * 3 + d * d * 3 + d * audio.output_dim
    return lm, enc


def _check_disk(out_dir: Path, lm_params: int, enc_params: int) -> None:
    # fp32 intermediate graphs + final graphs + the embedding table, with 10% headroom.
    needed = int((lm_params * 4 * 2 + enc_params * 4 * 2) * 1.1)
    free = shutil.disk_usage(out_dir.parent).free
    if free < needed:
        raise ExportError(f"{out_dir.parent}: not enough free disk space: need about {needed / 1e9:.1f} GB, "
                          f"have {free / 1e9:.1f} GB")


def _resolve_precisions(precision, encoder_precision, decoder_precision) -> tuple[str, str]:
    enc = encoder_precision or precision
    dec = decoder_precision or precision
    for field, value in (("encoder precision", enc), ("decoder precision", dec)):
        if value not in quantize.PRECISIONS:
            raise ExportError(f"{field} {value!r}: must be one of {', '.join(quantize.PRECISIONS)}")
    return enc, dec


def _export_encoder(checkpoint, work: Path, out: Path, precision: str) -> None:
    from .encoder_graph import ChunkEncoder, build_hf_encoder, check_against_hf, export_encoder_streamed

    hf_encoder = build_hf_encoder(checkpoint.audio_config, checkpoint.encoder_state, share_weights=True)
    chunk_encoder = ChunkEncoder(hf_encoder)
    diff = check_against_hf(hf_encoder, chunk_encoder, n_chunks=3)
    if diff > ENCODER_TOLERANCE * max(1.0, _scale(chunk_encoder)):
        raise ExportError(f"encoder: batched chunk wrapper differs from Qwen2_5OmniAudioEncoder.forward by {diff:.3g}")
    # Streamed like the decoder (see _export_decoder); an fp32 graph is written in place.
    fp32 = export_encoder_streamed(chunk_encoder, (out / "encoder.onnx") if precision == "fp32"
                                   else (work / "encoder.fp32.onnx"))
    del hf_encoder, chunk_encoder
    checkpoint.encoder_state = {}  # unmaps the checkpoint's encoder weights (the graph has them now)
    if precision == "fp32":
        _finish_in_place(fp32)
    else:
        quantize.convert(fp32, out / "encoder.onnx", precision, keep_float32_io=["mel", "audio_embeds"])


def _finish_in_place(path: Path) -> None:
    """A streamed fp32 graph as the package file: one self-contained file if small enough."""
    import onnx

    from .external import save_graph

    save_graph(onnx.load(str(path), load_external_data=False), path, quantize.LARGE_MODEL_BYTES)


def _scale(chunk_encoder) -> float:
    import torch

    with torch.no_grad():
        return float(chunk_encoder(torch.zeros(1, N_MELS, FRAMES_PER_CHUNK)).abs().max())


def _export_decoder(checkpoint, work: Path, out: Path, precision: str, attention: str, io_dtype: str,
                    file: str = "decoder.onnx") -> None:
    """Streamed (decoder_graph.export_decoder_streamed, quantize.convert): the weights pass
    through memory one at a time, so a real-size export fits in a few GB."""
    from .decoder_graph import export_decoder_streamed

    cfg = checkpoint.llm_config
    if precision == "fp32":  # the fp32 graph is the package's graph: write it in place
        _finish_in_place(export_decoder_streamed(checkpoint.lm_state, out / file, cfg, attention))
        return
    fp32 = export_decoder_streamed(checkpoint.lm_state, work / "decoder.fp32.onnx", cfg, attention)
    keep = ["logits"]  # float16 decoders: float16 embeddings and KV, float32 logits (contract)
    if precision == "int4" and io_dtype == "float16":  # float16 activations first, then 4-bit weights
        fp16 = work / "decoder.fp16.onnx"
        quantize.convert(fp32, fp16, "fp16", keep_float32_io=keep)
        fp32.unlink()
        Path(f"{fp32}.data").unlink(missing_ok=True)
        fp32 = fp16
    quantize.convert(fp32, out / file, precision, keep_float32_io=keep)


def _write_embeddings(lm_state, path: Path, dtype) -> None:
    """embeddings.npy, written in row blocks (no second full-size copy for the dtype change)."""
    table = lm_state["model.embed_tokens.weight"]
    rows = table.shape[0]
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(table.shape))
    step = max(1, (64 << 20) // max(1, table.shape[1] * 4))
    for start in range(0, rows, step):
        array[start:start + step] = table[start:start + step].numpy()
    array.flush()
    del array, table


def _manifest(checkpoint, out: Path, enc_precision: str, dec_precision: str, max_context: int, name: str,
              attention: str, io_dtype: str, replies=None, slots: bool = False) -> dict:
    from tokenizers import Tokenizer

    cfg = checkpoint.llm_config
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path))
    tokens = {n: int(checkpoint.tokens[n]) for n in TOKEN_NAMES}
    files = {}
    for path in sorted(out.iterdir()):
        if path.is_file():
            files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "created_by": f"listenloop.export {VERSION}",
        "audio": dict(AUDIO),
        "encoder": {"file": "encoder.onnx", "precision": enc_precision, "output_dim": checkpoint.audio_config.output_dim},
        "decoder": {"file": "decoder.onnx", "precision": dec_precision, "io_dtype": io_dtype,
                    "hidden_size": cfg["n_embd"], "num_layers": cfg["n_layer"], "num_heads": cfg["n_head"],
                    "num_kv_heads": cfg["n_query_groups"], "head_dim": cfg["head_size"],
                    "vocab_size": cfg["padded_vocab_size"], "rope_theta": float(cfg["rope_base"]),
                    "rms_norm_eps": float(cfg["norm_eps"]), "rope_position_rounding": "float16",
                    "max_context": int(max_context), "attention": attention,
                    "quantization": quantize.quantization_record(dec_precision),
                    **({"trained_context": int(cfg[TRAINED_CONTEXT])} if TRAINED_CONTEXT in cfg else {})},
        "embeddings": {"file": "embeddings.npy", "dtype": io_dtype, "shape": [cfg["padded_vocab_size"], cfg["n_embd"]]},
        "tokenizer": {"file": "tokenizer.json"},
        "tokens": tokens,
        "emotions": {n: tokens[n] for n in EMOTION_NAMES},
        "prompt": {"system_prompt": checkpoint.system_prompt,
                   "prefix_ids": prefix_ids(tokens, tokenizer, checkpoint.system_prompt)},
        "sampling": dict(SAMPLING),
        **({"reply_set": reply_set_ids(replies, tokens, tokenizer)} if replies else {}),
        **({"slot_decoder": {"file": SLOT_DECODER_FILE, "step_tokens": STEP}} if slots else {}),
        "files": files,
    }


def _partial_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


def _remove_stale_partials(out_dir: Path) -> None:
    """Remove what exports to `out_dir` by processes that no longer run left behind: one
    stopped by a signal (the command line exits at once) or killed has no chance to."""
    prefix = _partial_prefix(out_dir)
    for partial in out_dir.parent.glob(f"{prefix}*"):
        pid = partial.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's (or not a pid): leave it
    return True


def _build(checkpoint_dir: Path, tmp: Path, enc_precision: str, dec_precision: str, max_context: int,
           attention: str, io_dtype: str, replies=None, slots: bool = False) -> None:
    from .checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_dir, lazy=True)
    work = tmp / ".work"
    work.mkdir()
    _export_encoder(checkpoint, work, tmp, enc_precision)
    shutil.rmtree(work)  # the fp32 encoder is done with: free its disk before the decoder's
    work.mkdir()
    _export_decoder(checkpoint, work, tmp, dec_precision, attention, io_dtype)
    shutil.rmtree(work)
    if slots:  # the batched graph beside it (docs/DESIGN.md, "Fixed-slot batching")
        from .decoder_graph import SLOTS

        work.mkdir()
        _export_decoder(checkpoint, work, tmp, dec_precision, SLOTS, io_dtype, SLOT_DECODER_FILE)
        shutil.rmtree(work)
    _write_embeddings(checkpoint.lm_state, tmp / "embeddings.npy", np.dtype(io_dtype))
    shutil.copyfile(checkpoint.tokenizer_path, tmp / "tokenizer.json")
    manifest = _manifest(checkpoint, tmp, enc_precision, dec_precision, max_context, checkpoint.name, attention,
                         io_dtype, replies, slots)
    _write_manifest(tmp, manifest)


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def export_package(checkpoint_dir, out_dir, precision: str = "fp32", encoder_precision: str | None = None,
                   decoder_precision: str | None = None, max_context: int = 4096, force: bool = False,
                   attention: str = "grouped", kv_dtype: str | None = None, reply_set=None,
                   slots: bool = False) -> Path:
    """Export the checkpoint at `checkpoint_dir` to a model package folder `out_dir`. `attention`:
    the decoder graph's attention, "grouped" (CPUs) or "gqa" (GPUs), see decoder_graph.py.
    `kv_dtype`: the decoder's KV cache, embeddings and activations, "float32" or "float16"
    (default: float16 for fp16, else float32; int4 takes either: float16 is what GPU kernels
    such as CUDA's GroupQueryAttention run). `reply_set`: a reply-set file (read_reply_set) whose
    replies are the only ones the package may decode. `slots`: also write the slot decoder, which
    runs S streams' steps in one call (decoder_slots.onnx; fp32, fp16 and int4 only)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir).expanduser().absolute()
    enc_precision, dec_precision = _resolve_precisions(precision, encoder_precision, decoder_precision)
    if attention not in ATTENTIONS:
        raise ExportError(f"attention {attention!r}: must be one of {', '.join(ATTENTIONS)}")
    io_dtype = kv_dtype or IO_DTYPES_OF[dec_precision][0]
    if io_dtype not in IO_DTYPES_OF[dec_precision]:
        raise ExportError(f"kv_dtype {io_dtype}: a {dec_precision} decoder takes {' or '.join(IO_DTYPES_OF[dec_precision])}")
    for part, part_precision in (("decoder", dec_precision), ("encoder", enc_precision)):
        if slots and part_precision not in SLOT_PRECISIONS:  # with slots, the encoder batches the slots' chunks too
            raise ExportError(f"--slots: the slot {part} is exported at one of {', '.join(SLOT_PRECISIONS)}, not "
                              f"{part_precision} (int8 quantizes activations with one scale per call, which would mix "
                              "the slots' rows)")
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir}: already exists (pass --force to replace it)")
    if out_dir.exists() and not (out_dir / "manifest.json").is_file() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not a model package; refusing to replace it")
    replies = read_reply_set(reply_set) if reply_set is not None else None
    cfg, audio, _ = validate_checkpoint(checkpoint_dir)  # cheap: headers only, fails before long work
    if max_context <= 0 or max_context > cfg["block_size"]:
        raise ExportError(f"max_context {max_context}: must be in 1..{cfg['block_size']} (block_size)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lm_params, enc_params = _parameter_counts(cfg, audio)
    _check_disk(out_dir, lm_params * (2 if slots else 1), enc_params)  # the slot decoder holds the weights again
    _remove_stale_partials(out_dir)
    tmp = out_dir.parent / f"{_partial_prefix(out_dir)}{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        _build(checkpoint_dir, tmp, enc_precision, dec_precision, max_context, attention, io_dtype, replies, slots)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except (CheckpointError, ExportError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ExportError(f"{out_dir}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    return out_dir
