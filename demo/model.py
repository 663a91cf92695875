"""The demo model: the real model's architecture family, scaled down.

A transformers `Qwen2_5OmniAudioEncoder` driven chunk-wise (each 40-frame chunk is its own
"audio"; docs/PROTOCOL.md, "Encoder") and a transformers `Qwen2ForCausalLM` (untied embeddings, GQA, rope
theta 1e6) that reads the encoder's 10 vectors per chunk at the PAD rows of a listening block.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

from listenloop.protocol import FRAMES_PER_CHUNK, N_MELS


@dataclass(frozen=True)
class DemoSizes:
    encoder_d_model: int = 192
    encoder_layers: int = 3
    encoder_heads: int = 4
    encoder_ffn: int = 768
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    max_positions: int = 4096


def audio_config(sizes: DemoSizes) -> Qwen2_5OmniAudioEncoderConfig:
    return Qwen2_5OmniAudioEncoderConfig(
        num_mel_bins=N_MELS,
        d_model=sizes.encoder_d_model,
        encoder_layers=sizes.encoder_layers,
        encoder_attention_heads=sizes.encoder_heads,
        encoder_ffn_dim=sizes.encoder_ffn,
        output_dim=sizes.hidden,  # the proj Linear is the adapter into the LLM
        n_window=100,
        max_source_positions=1500,
        activation_function="gelu",
        scale_embedding=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    return -(-vocab_size // multiple) * multiple


def llm_config(sizes: DemoSizes, vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=padded_vocab_size(vocab_size),
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.hidden // sizes.heads,
        hidden_act="silu",
        max_position_embeddings=sizes.max_positions,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        use_sliding_window=False,
        attention_dropout=0.0,
    )


def chunkwise_encode(encoder: Qwen2_5OmniAudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """[B, 128, 40] mel chunks -> [B, 10, output_dim], each chunk encoded on its own.

    Same result as the HF forward with feature_lens=[40]*B (per-chunk conv padding, attention
    within a chunk, positions restarting at 0, pooling pairs inside a chunk), but batched as a
    dense [B, 20, D] tensor instead of a packed sequence, which is what the ONNX encoder
    computes too.
    """
    if mel.dim() != 3 or mel.shape[1:] != (encoder.num_mel_bins, FRAMES_PER_CHUNK):
        raise ValueError(f"mel chunks must be [B, {encoder.num_mel_bins}, {FRAMES_PER_CHUNK}], got {tuple(mel.shape)}")
    x = F.gelu(encoder.conv1(mel.to(encoder.conv1.weight.dtype)))
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)  # [B, 20, D]
    x = x + encoder.positional_embedding.positional_embedding[: x.shape[1]].to(x.dtype)
    batch, frames, dim = x.shape
    for layer in encoder.layers:
        attn = layer.self_attn
        h = layer.self_attn_layer_norm(x)
        q, k, v = (
            proj(h).view(batch, frames, attn.num_heads, attn.head_dim).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        x = x + attn.out_proj(o.transpose(1, 2).reshape(batch, frames, dim))
        x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
    x = x.view(batch, frames // 2, 2, dim).mean(dim=2)  # AvgPool1d(2, 2)
    return encoder.proj(encoder.ln_post(x))


def rounded_positions(n: int, offset: int = 0, device=None) -> torch.Tensor:
    """Absolute positions rounded through float16 (docs/PROTOCOL.md, "Listening step"); exact below 2048."""
    return torch.arange(offset, offset + n, device=device).to(torch.float16).to(torch.int64)


class DemoModel(nn.Module):
    def __init__(self, sizes: DemoSizes, vocab_size: int):
        super().__init__()
        self.sizes = sizes
        self.encoder = Qwen2_5OmniAudioEncoder(audio_config(sizes))
        self.llm = Qwen2ForCausalLM(llm_config(sizes, vocab_size))

    @property
    def audio_config(self) -> Qwen2_5OmniAudioEncoderConfig:
        return self.encoder.config

    @property
    def llm_config(self) -> Qwen2Config:
        return self.llm.config

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return chunkwise_encode(self.encoder, mel)

    def embed(self, ids: torch.Tensor, pad_rows: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, H] with audio vectors written at flat rows `pad_rows` of B·L
        (row-major), audio [N, 10, H] in the same order."""
        x = self.llm.get_input_embeddings()(ids)
        flat = x.reshape(-1, x.shape[-1]).index_put((pad_rows.reshape(-1),), audio.reshape(-1, x.shape[-1]))
        return flat.view_as(x)

    def hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = rounded_positions(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
        out = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False)
        return out.last_hidden_state

    def parameter_counts(self) -> dict[str, int]:
        return {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "llm": sum(p.numel() for p in self.llm.parameters()),
        }

    def describe(self) -> dict:
        return {"sizes": asdict(self.sizes), "parameters": self.parameter_counts()}
