"""The straightforward PyTorch way to run the model, with the runtime Engine's methods.

Decoder: `transformers.Qwen2ForCausalLM` with the litgpt weights mapped to HF names, and its own
`DynamicCache`. Encoder: `Qwen2_5OmniAudioEncoder` called as the reference drives it (all chunks
in one call, feature_lens = [40]*B). Protocol: docs/PROTOCOL.md ("Prompt", "Listening step",
"Reply") with greedy decisions and replies. Positions go through float16 before RoPE, passed as
the rounded integers.

It is the ground truth of the parity report and the baseline of the benchmarks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from listenloop.protocol import FRAMES_PER_CHUNK, N_MELS
from listenloop.protocol import VECTORS_PER_CHUNK as BLOCK_AUDIO

from .checkpoint import load_checkpoint
from .encoder_graph import build_hf_encoder, check_materialized, hf_encode
from .package import SAMPLING, prefix_ids


@dataclass
class ReferenceListenResult:
    spoke: bool
    p_speak: float
    decision_logits: np.ndarray  # float32[2]: KEEP_SILENCE, TEXT_BEGIN
    logits: np.ndarray  # float32[V] at the ASSISTANT position
    position: int


@dataclass
class ReferenceSpeakStep:
    token: int
    logits: np.ndarray


def rounded_positions(start: int, count: int) -> torch.Tensor:
    """[1, count] positions start.. after the float16 round trip, as integers."""
    return torch.arange(start, start + count).to(torch.float16).to(torch.float32).round().long()[None]


class TorchReference:
    """Same methods as `listenloop.engine.Engine`: reset, encode, listen, speak, position."""

    def __init__(self, checkpoint_dir, max_context: int | None = None, max_reply_tokens: int | None = None):
        from tokenizers import Tokenizer
        from transformers import Qwen2ForCausalLM

        # Lazy read + a model built on the meta device: every float32 weight is read once and
        # becomes the parameter itself, so a real-size model (13.6 GB) needs its size in memory,
        # not twice that, and skips random initialisation.
        checkpoint = load_checkpoint(checkpoint_dir, lazy=True)
        self.checkpoint = checkpoint
        config = checkpoint.hf_qwen2_config
        config._attn_implementation = "eager"
        with torch.device("meta"):
            self.model = Qwen2ForCausalLM(config).eval()
        state = {name: checkpoint.lm_state[name] for name in checkpoint.lm_state}
        missing, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        # Qwen2 has biases on q/k/v only; every weight must come from the checkpoint.
        if missing or unexpected:
            raise RuntimeError(f"weight mapping mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        rotary = self.model.model.rotary_emb
        self.model.model.rotary_emb = type(rotary)(config=config)  # its inverse frequencies are buffers, not weights
        check_materialized(self.model, "reference model")
        self.model.requires_grad_(False)
        self.encoder = build_hf_encoder(checkpoint.audio_config, checkpoint.encoder_state)
        self.tokens = checkpoint.tokens
        tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path))
        self.prefix = prefix_ids(self.tokens, tokenizer, checkpoint.system_prompt)
        self.capacity = int(max_context or checkpoint.llm_config["block_size"])
        self.max_reply_tokens = int(max_reply_tokens or SAMPLING["max_reply_tokens"])
        self._embed = self.model.get_input_embeddings()
        self.reset()

    @property
    def hidden(self) -> int:
        return self.checkpoint.llm_config["n_embd"]

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.model.config)
        self._position = 0
        self._previous = None  # token fed back first in the next block; None: feed the prefix
        self._speaking = False

    def encode(self, mel: np.ndarray) -> np.ndarray:
        mel = torch.as_tensor(np.asarray(mel, dtype=np.float32))
        if mel.ndim != 3 or tuple(mel.shape[1:]) != (N_MELS, FRAMES_PER_CHUNK):
            raise ValueError(f"mel must be [B, {N_MELS}, {FRAMES_PER_CHUNK}], got {list(mel.shape)}")
        return hf_encode(self.encoder, mel).numpy()

    def _forward(self, ids: list, audio_rows: dict) -> torch.Tensor:
        """Feed `ids` (audio vectors over the given PAD rows); return last-row logits."""
        with torch.no_grad():
            embeds = self._embed(torch.tensor([ids]))
            for row, audio in audio_rows.items():
                embeds[0, row:row + BLOCK_AUDIO] = torch.as_tensor(audio, dtype=embeds.dtype)
            T = len(ids)
            # The causal mask follows cache order, so the duplicate positions that rounding makes
            # above 2048 still mask correctly (as in the reference, which masks by absolute index).
            out = self.model(inputs_embeds=embeds, position_ids=rounded_positions(self._position, T),
                             cache=self._cache, use_cache=True, logits_to_keep=1)
        self._position += T
        return out.logits[0, -1].float()

    def listen(self, audio_embeds: np.ndarray) -> ReferenceListenResult:
        audio_embeds = np.asarray(audio_embeds, dtype=np.float32)
        if audio_embeds.shape != (BLOCK_AUDIO, self.hidden):
            raise ValueError(f"audio vectors must be [{BLOCK_AUDIO}, {self.hidden}], got {list(audio_embeds.shape)}")
        if self._speaking:
            raise RuntimeError("listen() during a reply: finish speak() first")
        t = self.tokens
        lead = list(self.prefix) if self._previous is None else [self._previous]
        ids = lead + [t["AUDIO_BEGIN"]] + [t["PAD"]] * BLOCK_AUDIO + [t["ASSISTANT"]]
        if self._position + len(ids) > self.capacity:
            raise RuntimeError(f"context full: {self._position} + {len(ids)} > {self.capacity}")
        logits = self._forward(ids, {len(lead) + 1: audio_embeds})
        silence, speak = float(logits[t["KEEP_SILENCE"]]), float(logits[t["TEXT_BEGIN"]])
        spoke = speak > silence
        margin = speak - silence
        p_speak = 1.0 / (1.0 + math.exp(-margin)) if margin > -700 else 0.0
        self._previous = t["TEXT_BEGIN"] if spoke else t["KEEP_SILENCE"]
        self._speaking = spoke
        return ReferenceListenResult(spoke=spoke, p_speak=p_speak,
                                     decision_logits=np.array([silence, speak], dtype=np.float32),
                                     logits=logits.numpy(), position=self._position)

    def speak(self, max_tokens: int | None = None) -> Iterator[ReferenceSpeakStep]:
        """Greedy reply after a TEXT_BEGIN decision, until TEXT_END (inclusive) or the cap."""
        if not self._speaking:
            raise RuntimeError("speak() without a TEXT_BEGIN decision")
        cap = self.max_reply_tokens if max_tokens is None else int(max_tokens)
        end = self.tokens["TEXT_END"]
        try:
            for _ in range(cap):
                if self._position + 1 > self.capacity:
                    break
                logits = self._forward([self._previous], {})
                token = int(logits.argmax())
                self._previous = token
                yield ReferenceSpeakStep(token=token, logits=logits.numpy())
                if token == end:
                    break
        finally:
            self._speaking = False
