"""Token sampling: greedy, temperature, top-k and top-p, seeded (docs/PROTOCOL.md, "Sampling").

The listening decision is always a two-way choice (KEEP_SILENCE or TEXT_BEGIN), made by
`decide`; `sample` picks reply tokens from the full vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import MAX_POSITIONS
from .errors import Bounds, ConfigError

# Ranges of the sampling settings and of a stream's decision options (runtime/PACKAGE_FORMAT.md,
# "Ranges"); a package's sampling section uses the same, except for its speak bias.
TEMPERATURE = Bounds(0.0, 100.0)  # 0 is greedy; at 100 every token is about equally likely
TOP_P = Bounds(0.0, 1.0, low_open=True)  # 1 keeps every token
TOP_K = Bounds(0, 2 ** 31 - 1, integer=True)  # 0 keeps every token
SEED = Bounds(0, 2 ** 63 - 1, integer=True)
# A stream's speak bias: +-50 already decides every chunk (benchmarks force decisions so);
# the bound keeps the biased logit an ordinary float.
SPEAK_BIAS = Bounds(-10000.0, 10000.0)
# Own-voice policy (docs/PROTOCOL.md, "Own voice"): the speak logit's handicap on chunks heard
# while the device's playback can echo into them. The default is measured in BENCHMARKS.md
# ("Own voice"): it removes replies to residual echo and keeps barge-in commands answered.
PLAYBACK_BIAS = -4.0
PLAYBACK_BIAS_BOUNDS = Bounds(-10000.0, 0.0)
NEAR_END_SHARE = 0.25  # of playback_bias, on chunks where someone seems to talk over the device
SPEAK_THRESHOLD = Bounds(0.0, 1.01)  # p_speak >= threshold speaks: 0 always, above 1 never
REPLY_TOKENS = Bounds(1, MAX_POSITIONS, integer=True)  # a reply never outgrows the context


@dataclass
class SamplingConfig:
    """How reply tokens (and, with temperature > 0, listening decisions) are drawn.

    Every field is checked on construction and again by `check()` (a stream checks its
    config when it is created): a value outside its range raises one ConfigError line."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        self.check()

    def check(self) -> "SamplingConfig":
        for name, bounds in (("temperature", TEMPERATURE), ("top_k", TOP_K), ("top_p", TOP_P)):
            problem = bounds.problem(getattr(self, name))
            if problem:
                raise ConfigError(f"sampling {name} {problem}")
        if self.seed is not None and not SEED.holds(self.seed):
            raise ConfigError(f"sampling seed {SEED.problem(self.seed)} (or None)")
        return self

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
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = np.array([silence_logit, speak_logit], dtype=np.float64) / t
        if not np.isfinite(scaled).all():  # a temperature so small it overflows: the greedy choice
            return bool(speak_logit > silence_logit)
        p_speak = softmax(scaled)[1]
        return bool(self.rng.random() < p_speak)
