"""A seeded random-weight checkpoint in the release layout (checkpoint.py), tiny or real-size.

    python -m listenloop.export.tiny OUT_DIR [--seed N] [--real-size [--layers N]]

Tiny sizes make every export and parity test run in seconds. Random weights alone would make
every listening decision the same, so a few logit biases are calibrated on a seeded synthetic
stream (not the one the parity tests use): channel 0 of every token embedding and audio vector
is a constant that no layer writes, so lm_head column 0 acts as a per-token logit bias. It is
set so that about a third of the chunks choose TEXT_BEGIN and every calibration reply reaches
TEXT_END within 12 tokens. Everything else stays random.

`--real-size` writes the real dimensions (≈ 13.6 GB fp32) shard by shard, for
size and speed measurements only, with no calibration.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from listenloop.protocol import N_MELS

from .checkpoint import hf_qwen2_state_from_litgpt, save_checkpoint
from .package import prefix_ids
from .tokenizer_build import build_tokenizer

TINY_LLM = {
    "name": "tiny-random", "block_size": 4096, "vocab_size": 0, "padded_vocab_size": 0, "n_layer": 2,
    "n_embd": 64, "n_head": 4, "n_query_groups": 2, "head_size": 16, "intermediate_size": 128,
    "mlp_class_name": "LLaMAMLP", "rope_base": 1000000.0, "rotary_percentage": 1.0,
    "norm_class_name": "RMSNorm", "norm_eps": 1e-6, "bias": False, "attn_bias": True,
    "lm_head_bias": False, "parallel_residual": False, "scale_embeddings": False,
}
TINY_AUDIO = {"num_mel_bins": N_MELS, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
              "d_model": 64, "max_source_positions": 1500, "n_window": 100, "output_dim": 64,
              "activation_function": "gelu", "scale_embedding": False}
REAL_LLM = dict(TINY_LLM, name="audiointeraction-random-real-size", block_size=32768, vocab_size=151643,
                padded_vocab_size=151936, n_layer=36, n_embd=2048, n_head=16, n_query_groups=2,
                head_size=128, intermediate_size=11008)
REAL_AUDIO = dict(TINY_AUDIO, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                  d_model=1280, output_dim=2048)

TINY_SYSTEM_PROMPT = "You are a helpful assistant. Answer questions you hear."
# Training text of the tiny tokenizer: the prompt and short replies, so merges look like words.
TRAINING_TEXT = [
    TINY_SYSTEM_PROMPT, "Yes, I can help with that.", "The kettle is boiling.", "Someone is at the door.",
    "It is raining outside.", "The baby is crying, please check.", "I heard a question: the answer is four.",
    "Your alarm is ringing.", "That sounds like glass breaking!", "Hello, how can I help you today?",
]
BIAS_CHANNEL = 0  # embedding channel held at a constant, so lm_head[:, 0] acts as a logit bias
BIAS_VALUE = 2.0
SPEAK_FRACTION = 0.3  # share of calibration chunks that choose TEXT_BEGIN
MAX_CALIBRATED_REPLY = 12
CALIBRATION_CHUNKS = 48
CALIBRATION_SEED = 1000  # parity tests use seeds below this


def _normal(gen, *shape, std):
    return torch.randn(*shape, generator=gen) * std


def random_llm_state(cfg: dict, gen: torch.Generator) -> dict:
    """litgpt-named weights, fan-in scaled so activations keep unit scale through the layers."""
    h, v, ff = cfg["n_embd"], cfg["padded_vocab_size"], cfg["intermediate_size"]
    q_rows = cfg["n_head"] * cfg["head_size"]
    kv_rows = cfg["n_query_groups"] * cfg["head_size"]
    state = {"transformer.wte.weight": _normal(gen, v, h, std=1.0),
             "transformer.ln_f.weight": 1.0 + _normal(gen, h, std=0.05),
             "lm_head.weight": _normal(gen, v, h, std=h ** -0.5)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        state[p + "norm_1.weight"] = 1.0 + _normal(gen, h, std=0.05)
        state[p + "attn.qkv.weight"] = _normal(gen, q_rows + 2 * kv_rows, h, std=h ** -0.5)
        state[p + "attn.qkv.bias"] = _normal(gen, q_rows + 2 * kv_rows, std=0.1)
        state[p + "attn.proj.weight"] = _normal(gen, h, q_rows, std=0.5 * q_rows ** -0.5)
        state[p + "norm_2.weight"] = 1.0 + _normal(gen, h, std=0.05)
        state[p + "mlp.fc_1.weight"] = _normal(gen, ff, h, std=h ** -0.5)
        state[p + "mlp.fc_2.weight"] = _normal(gen, ff, h, std=h ** -0.5)
        state[p + "mlp.proj.weight"] = _normal(gen, h, ff, std=0.5 * ff ** -0.5)
    return state


def random_encoder_state(audio: dict, gen: torch.Generator) -> dict:
    from .checkpoint import expected_encoder_shapes
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig

    config = Qwen2_5OmniAudioEncoderConfig(**audio)
    state = {}
    for key, shape in expected_encoder_shapes(config).items():
        if key.endswith("norm.weight") or key == "ln_post.weight":
            state[key] = 1.0 + _normal(gen, *shape, std=0.05)
        elif key.endswith("bias"):
            state[key] = _normal(gen, *shape, std=0.05)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = _normal(gen, *shape, std=fan_in ** -0.5)
    return state


# --- calibration (tiny only) ----------------------------------------------------------------

def _calibration_audio(encoder_state: dict, audio: dict, n_chunks: int, seed: int) -> torch.Tensor:
    """Audio vectors of a synthetic test stream (parity.synthetic_stream, another seed than the
    tests use) through the tiny encoder: [n_chunks, 10, H]."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig

    from .encoder_graph import build_hf_encoder, hf_encode
    from .parity import mel_chunks, synthetic_stream

    encoder = build_hf_encoder(Qwen2_5OmniAudioEncoderConfig(**audio), encoder_state)
    mel = torch.from_numpy(mel_chunks(synthetic_stream(n_chunks, seed=CALIBRATION_SEED + seed)))
    return hf_encode(encoder, mel)


class _Stepper:
    """Minimal protocol driver over the export module, used only to calibrate the biases."""

    def __init__(self, module, wte: torch.Tensor, n_layer: int):
        self.module, self.wte, self.n_layer = module, wte, n_layer
        self.past = None
        self.pos = 0

    def feed(self, embeds: torch.Tensor) -> torch.Tensor:
        T = embeds.shape[0]
        if self.past is None:
            layer = self.module.layers[0]
            self.past = [torch.zeros(1, 0, layer.n_kv, layer.head_dim) for _ in range(2 * self.n_layer)]
        out = self.module(embeds[None], torch.arange(self.pos, self.pos + T)[None], torch.tensor([T - 1]), *self.past)
        self.past = [torch.cat([p, n], dim=1) for p, n in zip(self.past, out[1:])]
        self.pos += T
        return out[0][0]


def _block(wte, tokens, audio_vectors, lead):
    ids = lead + [tokens["AUDIO_BEGIN"]] + [tokens["PAD"]] * 10 + [tokens["ASSISTANT"]]
    x = wte[torch.tensor(ids)].clone()
    x[-11:-1] = audio_vectors
    return x


def _simulate(module, wte, tokens, prefix, audio, n_layer, max_reply=64):
    """Greedy protocol over the streams.

    Returns (decisions, reply lengths, replies that never ended, final-normed hidden state at
    every decision)."""
    decisions, lengths, unfinished, hidden = [], [], 0, []
    captured = []  # final-normed last row of every step, replies included
    hook = module.norm.register_forward_hook(lambda mod, args, out: captured.append(out[0, -1]))
    try:
        for stream in audio:
            stepper, lead = _Stepper(module, wte, n_layer), list(prefix)
            for chunk in stream:
                logits = stepper.feed(_block(wte, tokens, chunk, lead))
                hidden.append(captured[-1])
                speak = bool(logits[tokens["TEXT_BEGIN"]] > logits[tokens["KEEP_SILENCE"]])
                decisions.append(speak)
                if not speak:
                    lead = [tokens["KEEP_SILENCE"]]
                    continue
                token, n = tokens["TEXT_BEGIN"], 0
                while n < max_reply:
                    token = int(stepper.feed(wte[torch.tensor([token])]).argmax())
                    n += 1
                    if token == tokens["TEXT_END"]:
                        break
                else:
                    unfinished += 1
                lengths.append(n)
                lead = [token]
    finally:
        hook.remove()
    return decisions, lengths, unfinished, torch.stack(hidden), torch.stack(captured)


def calibrate(llm_state: dict, encoder_state: dict, cfg: dict, audio: dict, tokens: dict, prefix: list,
              seed: int) -> None:
    """Set the TEXT_BEGIN/KEEP_SILENCE/TEXT_END bias entries in place (see module docstring)."""
    from .decoder_graph import ExportDecoder

    wte, lm_head = llm_state["transformer.wte.weight"], llm_state["lm_head.weight"]
    streams = _calibration_audio(encoder_state, audio, CALIBRATION_CHUNKS, seed)[None]
    hf_state = hf_qwen2_state_from_litgpt(llm_state, cfg)
    ks, tb, te = tokens["KEEP_SILENCE"], tokens["TEXT_BEGIN"], tokens["TEXT_END"]

    def run(max_reply):
        hf_state["lm_head.weight"] = lm_head
        module = ExportDecoder(hf_state, cfg).eval()
        with torch.no_grad():
            return _simulate(module, wte, tokens, prefix, streams, cfg["n_layer"], max_reply)

    def centre_speak_bias(hidden):
        # margin = (w_TB - w_KS)·h, with h_0 carrying the bias: speak iff margin > 0.
        lm_head[tb, BIAS_CHANNEL] = lm_head[ks, BIAS_CHANNEL]
        assert bool((hidden[:, BIAS_CHANNEL] > 0).all()), "bias channel must stay positive"
        thresholds = -(hidden @ (lm_head[tb] - lm_head[ks])) / hidden[:, BIAS_CHANNEL]
        lm_head[tb, BIAS_CHANNEL] += float(np.quantile(thresholds.numpy(), 1.0 - SPEAK_FRACTION))

    lm_head[tb, BIAS_CHANNEL] = lm_head[ks, BIAS_CHANNEL]
    hidden = run(1)[3]
    centre_speak_bias(hidden)
    # Replies: the smallest TEXT_END bias (bisection) with which every calibration reply ends
    # within MAX_CALIBRATED_REPLY tokens.
    base = float(lm_head[te, BIAS_CHANNEL])
    low, high = 0.0, 16.0
    for _ in range(5):
        mid = (low + high) / 2
        lm_head[te, BIAS_CHANNEL] = base + mid
        if run(MAX_CALIBRATED_REPLY)[2]:
            low = mid
        else:
            high = mid
    lm_head[te, BIAS_CHANNEL] = base + high
    # Replies change the context the next decisions see: re-centre on the full protocol.
    for _ in range(3):
        centre_speak_bias(run(MAX_CALIBRATED_REPLY)[3])


def make_tiny(out_dir, seed: int = 0, num_shards: int = 2) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        return _make_tiny(out_dir, seed, num_shards)
    finally:
        torch.set_num_threads(threads)


def _make_tiny(out_dir, seed: int, num_shards: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tokenizer, tokens = build_tokenizer(TRAINING_TEXT, vocab_size=400)
    cfg = dict(TINY_LLM)
    cfg["vocab_size"] = tokenizer.get_vocab_size()
    cfg["padded_vocab_size"] = 64 * math.ceil(cfg["vocab_size"] / 64)
    llm_state = random_llm_state(cfg, gen)
    encoder_state = random_encoder_state(TINY_AUDIO, gen)
    # The bias channel: constant in every token embedding and in every audio vector.
    llm_state["transformer.wte.weight"][:, BIAS_CHANNEL] = BIAS_VALUE
    encoder_state["proj.weight"][BIAS_CHANNEL] = 0.0
    encoder_state["proj.bias"][BIAS_CHANNEL] = BIAS_VALUE
    for i in range(cfg["n_layer"]):  # no layer writes the bias channel, so it stays constant
        llm_state[f"transformer.h.{i}.attn.proj.weight"][BIAS_CHANNEL] = 0.0
        llm_state[f"transformer.h.{i}.mlp.proj.weight"][BIAS_CHANNEL] = 0.0
    prefix = prefix_ids(tokens, tokenizer, TINY_SYSTEM_PROMPT)
    calibrate(llm_state, encoder_state, cfg, TINY_AUDIO, tokens, prefix, seed)
    protocol = dict(tokens, system_prompt=TINY_SYSTEM_PROMPT)
    return save_checkpoint(out_dir, llm_config=cfg, lm_state=llm_state, audio_config=TINY_AUDIO,
                           encoder_state=encoder_state, tokenizer=tokenizer, protocol_tokens=protocol,
                           num_shards=num_shards)


def make_real_size(out_dir, seed: int = 0, num_shards: int = 4, layers: int | None = None) -> Path:
    """Real dimensions, random weights, written one shard at a time to bound memory.

    `layers`: decoder layers (default 36, the real count); fewer keep every width real, for
    quicker measurements of the per-layer and fixed costs."""
    import json

    from safetensors.torch import save_file

    from .checkpoint import INDEX, expected_litgpt_shapes

    root = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    tokenizer, tokens = build_tokenizer(TRAINING_TEXT, vocab_size=400)
    cfg = dict(REAL_LLM)
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"layers must be > 0, got {layers}")
        cfg["n_layer"] = int(layers)
    shapes = expected_litgpt_shapes(cfg)
    keys = list(shapes)
    sizes = {k: int(np.prod(s)) * 4 for k, s in shapes.items()}
    from .checkpoint import _split_shards

    groups = _split_shards(keys, sizes, num_shards)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for key in group:
            shape = shapes[key]
            std = 0.05 if len(shape) == 1 else shape[-1] ** -0.5
            shard[key] = (1.0 if key.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight")) else 0.0) \
                + _normal(gen, *shape, std=std)
        root.mkdir(parents=True, exist_ok=True)
        save_file(shard, str(root / name))
        weight_map.update({k: name for k in group})
        del shard
    # Release-sized vocabulary, but our small tokenizer: control ids go at the release ids.
    save_checkpoint(root, llm_config=cfg, lm_state={}, audio_config=REAL_AUDIO,
                    encoder_state=random_encoder_state(REAL_AUDIO, gen), tokenizer=tokenizer,
                    protocol_tokens={"system_prompt": TINY_SYSTEM_PROMPT}, num_shards=0, write_lm=False)
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())},
                                          "weight_map": weight_map}, indent=2), encoding="utf-8")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m listenloop.export.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-size", action="store_true", help="real dimensions (~13.6 GB), for measurements")
    parser.add_argument("--layers", type=int, help="with --real-size: decoder layers (default 36)")
    args = parser.parse_args(argv)
    if args.layers is not None and not args.real_size:
        parser.error("--layers needs --real-size")
    out = (make_real_size(args.out_dir, args.seed, layers=args.layers) if args.real_size
           else make_tiny(args.out_dir, args.seed))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
