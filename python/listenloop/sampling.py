"""Token sampling: greedy, temperature, top-k and top-p, seeded (docs/PROTOCOL.md, "Sampling").

The listening decision is always a two-way choice (KEEP_SILENCE or TEXT_BEGIN), made by
`decide`; `sample` picks reply tokens from the full vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the tokens top-p keeps.

    Sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, and always keep
    the most likely token.
    """
    order = np.argsort(probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep_sorted = cumulative > 1.0 - top_p
    keep_sorted[-1] = True
    keep = np.zeros(probs.shape, dtype=bool)
    keep[order] = keep_sorted
    return keep


class Sampler:
    """Picks tokens from logits according to a SamplingConfig, reproducibly for a given seed."""

    def __init__(self, config: SamplingConfig | None = None):
        self.config = config or SamplingConfig()
        self.rng = np.random.default_rng(self.config.seed)

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities `sample` draws from (after temperature, top-k and top-p)."""
        cfg = self.config
        scaled = np.asarray(logits, dtype=np.float64) / max(cfg.temperature, 1e-8)
        if 0 < cfg.top_k < scaled.size:
            kth = np.partition(scaled, -cfg.top_k)[-cfg.top_k]
            scaled = np.where(scaled >= kth, scaled, -np.inf)
        probs = softmax(scaled)
        if cfg.top_p < 1.0:
            probs = np.where(top_p_mask(probs, cfg.top_p), probs, 0.0)
            probs /= probs.sum()
        return probs

    def sample(self, logits: np.ndarray) -> int:
        if self.config.greedy:
            return int(np.argmax(logits))
        probs = self.distribution(logits)
        return int(self.rng.choice(probs.size, p=probs))

    def decide(self, silence_logit: float, speak_logit: float) -> bool:
        """True to speak. Greedy: speak only if its logit is strictly larger (ties stay silent)."""
        if self.config.greedy:
            return bool(speak_logit > silence_logit)
        t = self.config.temperature
        p_speak = softmax(np.array([silence_logit, speak_logit]) / t)[1]
        return bool(self.rng.random() < p_speak)
