"""The Model and the streams the figures run on, each with a policy fixed at creation.

On a random model replies are forced with speak_bias +50 and scripted by `ScriptedReplies`
("best non-control token, TEXT_END after exactly N tokens"; which decisions may speak is part of
the script), so every reply has text and a known length. `listening_stream`: speak_bias +50
keeps p_speak near 1, so no quiet-moment reset (docs/PROTOCOL.md, "Context policy") interrupts
the run, while its script never lets it speak: every timed step is a steady 13-token step, and
the context fills up to its capacity.
"""
from __future__ import annotations

import numpy as np

from ..sampling import Sampler, SamplingConfig


ALWAYS_SPEAK = 50.0  # speak_bias that makes any model choose TEXT_BEGIN (p_speak near 1)


class ScriptedReplies(Sampler):
    """Replies of exactly `reply_tokens` text tokens on any model (random ones included).

    Reply tokens: the best non-control token, then TEXT_END once `reply_tokens` were given.
    Decisions: greedy on the logits (speak_bias included), but only decision number d
    (counted from 1 over the sampler's life) with d % speak_every == speak_at % speak_every
    may speak: every `speak_every`-th decision by default, so long replies do not turn every
    chunk into a catch-up; speak_every 0 never speaks. The script is part of the stream's
    policy, fixed at creation; a stream that is reset keeps counting its decisions.
    """

    def __init__(self, tokens: dict, reply_tokens: int, speak_every: int = 1, speak_at: int = 0):
        super().__init__(SamplingConfig())
        if reply_tokens < 1 or speak_every < 0:
            raise ValueError("reply_tokens must be >= 1 and speak_every >= 0")
        self.text_end = tokens["TEXT_END"]
        self.control = np.array(sorted(set(tokens.values())), dtype=np.int64)
        self.reply_tokens = reply_tokens
        self.speak_every = speak_every
        self.speak_at = speak_at
        self._given = 0
        self._decisions = 0

    def may_speak(self, decision: int) -> bool:
        """Whether decision number `decision` (from 1) is allowed to speak."""
        return bool(self.speak_every) and decision % self.speak_every == self.speak_at % self.speak_every

    def decide(self, silence_logit: float, speak_logit: float) -> bool:
        self._given = 0
        self._decisions += 1
        return self.may_speak(self._decisions) and bool(speak_logit > silence_logit)

    def sample(self, logits: np.ndarray) -> int:
        if self._given >= self.reply_tokens:
            return self.text_end
        self._given += 1
        row = np.array(logits, dtype=np.float32, copy=True)
        row[self.control] = -np.inf
        return int(np.argmax(row))


def scripted_policy(tokens: dict, reply_tokens: int, speak_every: int = 1, speak_at: int = 0) -> dict:
    """Policy options of a stream or session that speaks on scripted decisions (speak_bias +50)
    with `reply_tokens`-token scripted replies; max_reply_tokens leaves room for TEXT_END."""
    return {"speak_bias": ALWAYS_SPEAK, "sampler": ScriptedReplies(tokens, reply_tokens, speak_every, speak_at),
            "max_reply_tokens": reply_tokens + 1}


def replying_stream(model, reply_tokens: int, speak_every: int = 1, speak_at: int = 0):
    """A DecoderStream over `model` with scripted_policy."""
    return model.stream(**scripted_policy(model.tokens, reply_tokens, speak_every, speak_at))


def listening_stream(model, reply_tokens: int = 16):
    """A DecoderStream over `model` that never speaks, with p_speak held near 1 so that only a
    full context resets it (docs/PROTOCOL.md, "Context policy"). `reply_tokens` sets the room
    kept free for a reply, as in replying_stream."""
    return replying_stream(model, reply_tokens, speak_every=0)


def load_model(package=None, profile="cpu", max_context: int | None = None):
    """The shared, read-only Model of a package (`package`: folder, ModelPackage or None)."""
    from ..model import Model

    return Model(package, profile, max_context=max_context)
