"""Greedy streaming protocol loop over the torch demo model with a KV cache (docs/PROTOCOL.md,
"Listening step" and "Reply").

Listening: the first step feeds prefix + block, later steps [fed-back token] + block; the
decision is the argmax over {KEEP_SILENCE, TEXT_BEGIN} at the ASSISTANT row, with an
optional speak bias on TEXT_BEGIN like the package's sampling.speak_bias.
Speaking: greedy single-token steps from TEXT_BEGIN until TEXT_END or the cap; no audio is
consumed meanwhile, and TEXT_END becomes the next block's fed-back token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from listenloop.protocol import VECTORS_PER_CHUNK

from .layout import Protocol
from .model import DemoModel, rounded_positions


@dataclass
class Decision:
    chunk: int
    spoke: bool
    p_speak: float
    reply_ids: list[int]  # emotion + text tokens + TEXT_END when spoke (TEXT_BEGIN excluded)


class TorchListener:
    def __init__(self, model: DemoModel, protocol: Protocol, max_reply_tokens: int = 48, speak_bias: float = 0.0):
        self.model = model.eval()
        self.protocol = protocol
        self.tokens = protocol.tokens
        self.max_reply_tokens = max_reply_tokens
        self.speak_bias = speak_bias  # added to the TEXT_BEGIN logit before the two-way decision
        self.reset()

    def reset(self) -> None:
        self._cache = None
        self._position = 0
        self._fed_back: list[int] | None = None  # tokens not yet in the cache; None: prefix next
        self._chunk = 0

    def _step(self, embeds: torch.Tensor) -> torch.Tensor:
        positions = rounded_positions(embeds.shape[1], self._position).unsqueeze(0)
        out = self.model.llm(inputs_embeds=embeds, position_ids=positions, cache=self._cache,
                             use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        self._position += embeds.shape[1]
        return out.logits[0, -1]

    @torch.no_grad()
    def listen(self, mel: np.ndarray) -> Decision:
        """Consume one chunk's [128, 40] mel; speak the whole reply if the decision is TEXT_BEGIN."""
        t = self.protocol.tokens
        head = list(self.protocol.prefix_ids) if self._fed_back is None else self._fed_back
        ids = head + [t["AUDIO_BEGIN"]] + [t["PAD"]] * VECTORS_PER_CHUNK + [t["ASSISTANT"]]
        audio = self.model.encode(torch.from_numpy(np.asarray(mel, np.float32))[None])
        ids_t = torch.tensor([ids])
        pad_rows = torch.arange(len(head) + 1, len(head) + 1 + VECTORS_PER_CHUNK)
        logits = self._step(self.model.embed(ids_t, pad_rows, audio))
        pair = torch.stack([logits[t["KEEP_SILENCE"]], logits[t["TEXT_BEGIN"]]])
        p_speak = float(torch.softmax(pair.float(), 0)[1])
        spoke = float(pair[1] - pair[0]) + self.speak_bias > 0.0
        decision = Decision(self._chunk, spoke, p_speak, [])
        self._chunk += 1
        if not decision.spoke:
            self._fed_back = [t["KEEP_SILENCE"]]
            return decision
        token = t["TEXT_BEGIN"]
        embed = self.model.llm.get_input_embeddings()
        for _ in range(self.max_reply_tokens):
            token = int(self._step(embed(torch.tensor([[token]]))).argmax())
            decision.reply_ids.append(token)
            if token == t["TEXT_END"]:
                break
        else:
            # Cap reached mid-reply: the last token is not in the cache yet; the next block
            # feeds it, then a TEXT_END that closes the turn.
            self._fed_back = [token, t["TEXT_END"]]
            return decision
        self._fed_back = [token]  # the reply's TEXT_END
        return decision


class PackageListener:
    """The same greedy loop through listenloop's Model and a DecoderStream on an exported model
    package: what a user of the shipped model runs (ONNX Runtime, the package's precision, its
    bounded context and context policy, the manifest's speak bias unless `speak_bias`
    overrides it)."""

    def __init__(self, package, speak_bias: float | None = None, profile: str = "cpu"):
        from listenloop.model import Model

        self.model = Model(package, profile)
        self.tokens = self.model.tokens
        self.with_speak_bias(speak_bias)

    def with_speak_bias(self, speak_bias: float | None) -> None:
        """Listen from now on with another speak bias: a new stream over the same model."""
        from listenloop.sampling import SamplingConfig

        self.stream = self.model.stream(sampling=SamplingConfig(temperature=0.0), speak_bias=speak_bias)
        self.speak_bias = self.stream.policy.speak_bias
        self.reset()

    def reset(self) -> None:
        self.stream.reset()
        self._chunk = 0

    def next_recording(self) -> None:
        """Number chunks from 0 again but keep listening in the same context, as an always-on
        device hears one recording after another."""
        self._chunk = 0

    def listen(self, mel: np.ndarray) -> Decision:
        from listenloop.context import chunk_level

        result = self.stream.listen(self.model.encode(mel)[0], chunk_level(mel))
        decision = Decision(self._chunk, result.spoke, result.p_speak, [])
        self._chunk += 1
        if result.spoke:
            decision.reply_ids = [step.token for step in self.stream.speak()]
        return decision
