"""The audio encoder as a batched per-chunk graph: mel [B,128,40] -> audio_embeds [B,10,H].

HF's `Qwen2_5OmniAudioEncoder.forward` packs chunks into one sequence with data-dependent
splits (cu_seqlens, `.tolist()`), which does not export to a graph with a dynamic batch. Since
each 0.4 s chunk is a pure function of its own 40 frames (docs/PROTOCOL.md, "Encoder"),
`ChunkEncoder` runs the same submodules (conv1, conv2, positional rows 0..19, the layers,
pooling, ln_post, proj) over a batch of independent chunks. `check_against_hf` proves the equivalence numerically.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from listenloop.protocol import FRAMES_PER_CHUNK as FRAMES
from listenloop.protocol import N_MELS
from listenloop.protocol import VECTORS_PER_CHUNK as VECTORS

from .decoder_graph import OPSET


def build_hf_encoder(audio_config, encoder_state: dict, share_weights: bool = False):
    """transformers' own encoder module with the checkpoint's weights (strict load).

    `share_weights=True`: the module takes the state's tensors themselves (memory-mapped from
    the checkpoint) instead of copies, and is built without allocating or initialising weights
    of its own: about the encoder's size in memory instead of twice that plus the init time."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniAudioEncoder,
        SinusoidsPositionEmbedding,
    )

    config = audio_config
    config._attn_implementation = "eager"
    if not share_weights:
        encoder = Qwen2_5OmniAudioEncoder._from_config(config, dtype=torch.float32).eval()
        encoder.load_state_dict(encoder_state, strict=True)
        encoder.requires_grad_(False)
        return encoder
    with torch.device("meta"):
        encoder = Qwen2_5OmniAudioEncoder._from_config(config, dtype=torch.float32).eval()
    encoder.load_state_dict(encoder_state, strict=True, assign=True)
    # The one non-persistent buffer: the sinusoid table, computed (as the module's own init does).
    encoder.positional_embedding = SinusoidsPositionEmbedding(config.max_source_positions, config.d_model)
    check_materialized(encoder, "encoder")
    encoder.requires_grad_(False)
    return encoder.eval()


def check_materialized(module: torch.nn.Module, what: str) -> None:
    """After building on the meta device and loading with assign=True: every parameter and
    buffer must hold data (a non-persistent buffer the state dict does not carry would not)."""
    meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"{what}: no weights for {meta[:3]}")


def hf_encode(encoder, mel: torch.Tensor) -> torch.Tensor:
    """The reference's way: all chunks in one call with feature_lens = [40, 40, ...]."""
    B = mel.shape[0]
    features = mel.permute(1, 0, 2).reshape(mel.shape[1], B * FRAMES)
    with torch.no_grad():
        out = encoder(features, feature_lens=torch.full((B,), FRAMES, dtype=torch.long))
    return out.last_hidden_state.reshape(B, VECTORS, -1)


class ChunkEncoder(nn.Module):
    """Batched chunk-wise forward over the submodules of an HF `Qwen2_5OmniAudioEncoder`."""

    def __init__(self, hf_encoder):
        super().__init__()
        self.conv1, self.conv2 = hf_encoder.conv1, hf_encoder.conv2
        self.layers = hf_encoder.layers
        self.ln_post, self.proj = hf_encoder.ln_post, hf_encoder.proj
        # Positions restart at 0 in every chunk: rows 0..19 of the sinusoid table.
        rows = hf_encoder.positional_embedding.positional_embedding[: FRAMES // 2].clone()
        self.register_buffer("positions", rows, persistent=False)
        self.heads = hf_encoder.config.encoder_attention_heads

    def _attention(self, layer, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        B, S, C = x.shape
        head_dim = C // self.heads

        def split(t):
            return t.view(B, S, self.heads, head_dim).transpose(1, 2)

        q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(B, S, C)
        return attn.out_proj(out)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.conv1(mel))  # the valid-frame mask is all ones for full chunks
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)  # [B, 20, d]
        x = x + self.positions
        for layer in self.layers:
            x = x + self._attention(layer, layer.self_attn_layer_norm(x))
            h = layer.activation_fn(layer.fc1(layer.final_layer_norm(x)))
            x = x + layer.fc2(h)
        B, S, C = x.shape
        x = x.reshape(B, S // 2, 2, C).mean(dim=2)  # AvgPool1d(2, 2) over time
        return self.proj(self.ln_post(x))


def check_against_hf(hf_encoder, chunk_encoder: ChunkEncoder, n_chunks: int = 5, seed: int = 0) -> float:
    """Max abs difference between the batched wrapper and HF's forward on several chunks at once."""
    gen = torch.Generator().manual_seed(seed)
    mel = (torch.randn(n_chunks, N_MELS, FRAMES, generator=gen) * 0.4).clamp(-1.0, 1.5)
    with torch.no_grad():
        ours = chunk_encoder(mel)
    return float((ours - hf_encode(hf_encoder, mel)).abs().max())


def export_encoder(chunk_encoder: ChunkEncoder, path: Path, export_params: bool = True) -> Path:
    from .decoder_graph import weights_hidden_from_shape_inference

    path = Path(path)
    with torch.no_grad(), weights_hidden_from_shape_inference(chunk_encoder, hide=not export_params):
        torch.onnx.export(chunk_encoder.eval(), (torch.zeros(2, N_MELS, FRAMES),), str(path),
                          input_names=["mel"], output_names=["audio_embeds"],
                          dynamic_axes={"mel": {0: "B"}, "audio_embeds": {0: "B"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          export_params=export_params)
    return path


def export_encoder_streamed(chunk_encoder: ChunkEncoder, path: Path) -> Path:
    """The graph `export_encoder` writes, weights streamed into `<name>.data` one at a time
    (external.py): torch.onnx copies no weight, and folds no transpose (each Linear becomes the
    MatMul it exports as, with Wᵀ as its parameter). Rewires `chunk_encoder`'s Linear layers."""
    from .decoder_graph import linear_as_matmul
    from .external import attach_initializers

    linear_as_matmul(chunk_encoder)
    params = dict(chunk_encoder.named_parameters())
    path = export_encoder(chunk_encoder, path, export_params=False)

    def fetch(param):
        return lambda: param.detach().float().contiguous().numpy()

    attach_initializers(path, 1, {name: fetch(param) for name, param in params.items()})
    return path
