"""Save a trained demo model in the release checkpoint layout (listenloop.export.checkpoint), so
the same `listenloop export` path that packages the real model packages the demo one.

  python -m demo.release --run demo/.cache/run --out demo/.cache/checkpoint
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from listenloop.export.checkpoint import litgpt_state_from_hf_qwen2, save_checkpoint

from . import tasks, vocab
from .model import DemoModel
from .train import TRAINED_CONTEXT

CHECKPOINT_NAME = "listenloop-demo"


def litgpt_config(model: DemoModel, vocab_size: int) -> dict:
    """model_config.yaml for the demo LLM (litgpt Config fields)."""
    c = model.llm_config
    return {
        "name": CHECKPOINT_NAME, "block_size": c.max_position_embeddings, "vocab_size": vocab_size,
        "padded_vocab_size": c.vocab_size, "n_layer": c.num_hidden_layers, "n_embd": c.hidden_size,
        "n_head": c.num_attention_heads, "n_query_groups": c.num_key_value_heads, "head_size": c.head_dim,
        "intermediate_size": c.intermediate_size, "mlp_class_name": "LLaMAMLP", "rope_base": 1_000_000.0,
        "rotary_percentage": 1.0, "norm_class_name": "RMSNorm", "norm_eps": c.rms_norm_eps, "bias": False,
        "attn_bias": True, "lm_head_bias": False, "parallel_residual": False, "scale_embeddings": False,
        "trained_context": TRAINED_CONTEXT,
    }


def audio_config_dict(model: DemoModel) -> dict:
    c = model.audio_config
    return {"num_mel_bins": c.num_mel_bins, "encoder_layers": c.encoder_layers,
            "encoder_attention_heads": c.encoder_attention_heads, "encoder_ffn_dim": c.encoder_ffn_dim,
            "d_model": c.d_model, "max_source_positions": c.max_source_positions, "n_window": c.n_window,
            "output_dim": c.output_dim, "activation_function": c.activation_function,
            "scale_embedding": c.scale_embedding}


def save_release(model: DemoModel, tokenizer, tokens: dict[str, int], out_dir: Path) -> Path:
    cfg = litgpt_config(model, tokenizer.get_vocab_size())
    lm_state = litgpt_state_from_hf_qwen2({k: v.detach().float().cpu() for k, v in model.llm.state_dict().items()}, cfg)
    encoder_state = {k: v.detach().float().cpu() for k, v in model.encoder.state_dict().items()}
    out = save_checkpoint(out_dir, llm_config=cfg, lm_state=lm_state, audio_config=audio_config_dict(model),
                          encoder_state=encoder_state, tokenizer=tokenizer,
                          protocol_tokens=vocab.protocol_file(tokens), num_shards=1)
    write_reply_set(Path(out) / REPLY_SET_FILE)
    return out


REPLY_SET_FILE = "reply_set.json"  # `listenloop export --reply-set`: the only replies the package may say


def write_reply_set(path: Path) -> None:
    """The demo's replies (tasks.REPLIES) in the exporter's reply-set format."""
    path.write_text(json.dumps([{"emotion": r.emotion, "text": r.text} for r in tasks.REPLIES], indent=1) + "\n")


def main(argv=None) -> None:
    from .evaluate import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path(__file__).resolve().parent / ".cache" / "run")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".cache" / "checkpoint")
    args = p.parse_args(argv)
    model, _, tokenizer = load_model(args.run)
    _, tokens = vocab.demo_tokenizer(args.run / "tokenizer")
    print(save_release(model, tokenizer, tokens, args.out))


if __name__ == "__main__":
    main()
