"""When a stream's bounded context is rebuilt, and what the rebuilt context holds
(docs/PROTOCOL.md, "Context policy").

The KV cache holds `capacity` tokens. A reset keeps the prompt and re-prefills the last few
chunks heard since the last reply, each followed by KEEP_SILENCE as in training; audio that
was already answered is never re-fed, so a reset cannot make the model answer it twice.

A reset happens
- at a quiet moment once the context is past half of its listening room (and at least as
  many new chunks as a reset re-prefills): the model's last few decisions were silent with a
  low p_speak, and, where the caller passes chunk levels, those chunks were no louder than the
  background, so no utterance is likely to be in progress;
- or, failing that, when the next listening step would leave no room for a reply.

Every decision depends only on the stream's own positions and decisions, so resets land on
the same chunk for the same audio.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import ModelPackageError
from .protocol import STEP

log = logging.getLogger("listenloop")

HISTORY_CHUNKS = 8  # 3.2 s re-prefilled: holds a command in progress
QUIET_CHUNKS = 3  # silent decisions in a row that make a quiet moment
QUIET_P_SPEAK = 0.02  # ... each with p_speak below this
QUIET_FROM = 0.5  # share of the listening room after which a quiet moment resets
LEVEL_FLOOR_CHUNKS = 25  # the background level is the quietest chunk of the last 10 s ...
LEVEL_MARGIN = 0.25  # ... and a chunk 10 dB above it (0.25 in normalised log-mel) has sound in it
MAX_POSITIONS = 32768  # the released model's position limit (its training block size)


def chunk_level(mel) -> float:
    """How loud a chunk is: the loudest frame's mean over the mel bins, in the normalised
    log-mel the encoder sees (0.25 per 10 dB)."""
    return float(mel.mean(axis=-2).max())


def reset_size(prefix_len: int, chunks: int) -> int:
    """Tokens in the cache after a reset that re-prefills `chunks` chunks."""
    return prefix_len + chunks * STEP - 1 if chunks else 0


def reply_reserve(capacity: int, max_reply_tokens: int) -> int:
    """Room kept free after every listening step so that a reply can follow it."""
    return min(max_reply_tokens + 1, capacity // 4)


def minimum_capacity(prefix_len: int, history_chunks: int = HISTORY_CHUNKS) -> int:
    """The smallest context in which a reset leaves room for as many new chunks as it re-prefilled
    plus the largest reply reserve (a quarter of the capacity)."""
    used = reset_size(prefix_len, history_chunks) + history_chunks * STEP
    return -(-used * 4 // 3)  # used <= capacity - capacity // 4


def check_capacity(requested: int, *, prefix_len: int, package_context: int, trained_context: int,
                   what: str = "max_context", kv_bytes_per_token: int = 0, available_bytes: int | None = None) -> int:
    """`requested` if a stream can run in it; one ModelPackageError line if not.

    A capacity must be a whole number of tokens between `minimum_capacity` and MAX_POSITIONS,
    and, when `available_bytes` is known, one stream's KV cache (`requested` times
    `kv_bytes_per_token`) must fit in it: the check comes before anything is allocated."""
    import numbers

    from .errors import show

    def size(nbytes: int) -> str:
        for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if nbytes >= scale:
                return f"{nbytes / scale:.1f} {unit}"
        return f"{nbytes} B"

    if isinstance(requested, bool) or not isinstance(requested, numbers.Integral):
        raise ModelPackageError(f"{what} must be a whole number of tokens, got {show(requested)}")
    requested = int(requested)
    low = minimum_capacity(prefix_len)
    if requested < low:
        raise ModelPackageError(
            f"{what} {requested} is too small: a context reset keeps the {prefix_len}-token prompt and re-prefills "
            f"{HISTORY_CHUNKS} chunks ({reset_size(prefix_len, HISTORY_CHUNKS)} tokens), then needs room for as many "
            f"new chunks and a reply; use at least {low}")
    if requested > MAX_POSITIONS:
        raise ModelPackageError(f"{what} {requested} is above the model's {MAX_POSITIONS}-position limit")
    needed = requested * kv_bytes_per_token
    if available_bytes is not None and needed > available_bytes:
        fits = max(0, available_bytes // kv_bytes_per_token) if kv_bytes_per_token else 0
        raise ModelPackageError(
            f"{what} {requested} needs {size(needed)} ({needed} bytes) for one stream's KV cache, but only "
            f"{size(available_bytes)} ({available_bytes} bytes) of memory is available; at most {fits} tokens fit")
    if requested > trained_context:
        log.warning("%s %d is above the %d tokens of context this model was trained for; replies may degrade "
                    "past that point (the package's default is %d)", what, requested, trained_context, package_context)
    return requested


@dataclass(frozen=True)
class ContextPolicy:
    capacity: int
    prefix_len: int
    reply_reserve: int
    history_chunks: int = HISTORY_CHUNKS

    @property
    def quiet_from(self) -> int:
        """Position from which a quiet moment triggers a reset: half-way through the listening
        room, and never before as many new chunks as a reset re-prefills."""
        after_reset = reset_size(self.prefix_len, self.history_chunks)
        room = self.capacity - self.reply_reserve - after_reset
        return after_reset + max(self.history_chunks * STEP, int(room * QUIET_FROM))

    def must_reset(self, position: int, step_tokens: int) -> bool:
        """The next listening step of `step_tokens` would leave less than the reply reserve."""
        return position + step_tokens + self.reply_reserve > self.capacity

    def quiet_reset(self, position: int, quiet_run: int) -> bool:
        return position >= self.quiet_from and quiet_run >= QUIET_CHUNKS
