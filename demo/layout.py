"""The streaming token layout (docs/PROTOCOL.md, "Prompt", "Listening step", "Reply"), built
from chunk labels.

  prefix:  [ONLINE, ENGLISH, SYSTEM, TEXT_BEGIN] + system prompt + [TEXT_END]
  chunk 0: [AUDIO_BEGIN, PAD×10, ASSISTANT] + decision
  chunk k: [fed-back token, AUDIO_BEGIN, PAD×10, ASSISTANT] + decision, where the fed-back token
           is the previous chunk's KEEP_SILENCE or its reply's TEXT_END, i.e. the token already in
           the sequence: nothing is inserted.
  silent decision: KEEP_SILENCE
  reply decision:  TEXT_BEGIN, emotion, text tokens, TEXT_END (no audio elapses)

The loss covers the decision, the emotion, the text and TEXT_END; prompt, AUDIO_BEGIN, PAD and
ASSISTANT are never targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from listenloop.protocol import BLOCK, PREFIX_HEAD, TOKEN_NAMES, VECTORS_PER_CHUNK

from . import tasks


@dataclass(frozen=True)
class Protocol:
    tokens: dict[str, int]  # protocol token name -> id
    prefix_ids: tuple[int, ...]
    reply_ids: tuple[tuple[int, ...], ...]  # per tasks.REPLIES index: TEXT_BEGIN, emotion, text..., TEXT_END

    @classmethod
    def build(cls, tokens: dict[str, int], encode) -> "Protocol":
        """`encode(text) -> list[int]` is the tokenizer's plain text encoding (no special tokens)."""
        missing = [n for n in TOKEN_NAMES if n not in tokens]
        if missing:
            raise ValueError(f"protocol tokens missing: {missing}")
        prefix = (*(tokens[name] for name in PREFIX_HEAD), *encode(tasks.SYSTEM_PROMPT), tokens["TEXT_END"])
        replies = tuple(
            (tokens["TEXT_BEGIN"], tokens[r.emotion], *encode(r.text), tokens["TEXT_END"]) for r in tasks.REPLIES
        )
        return cls(dict(tokens), prefix, replies)


@dataclass
class Sequence:
    ids: np.ndarray  # int64 [L]
    targets: np.ndarray  # int64 [L]: the token to predict at each position, -100 where no loss
    speak_decision: np.ndarray  # bool [L]: the position's target is a TEXT_BEGIN decision
    pad_positions: np.ndarray  # int64 [n_chunks, 10]: rows that take the chunk's audio vectors
    n_chunks: int  # chunks used (a sequence may be cut to fit max_tokens)


def build_sequence(protocol: Protocol, labels: np.ndarray, max_tokens: int, history: int = 0) -> Sequence:
    """Token layout for a stream whose chunk k is labelled labels[k] (reply index or < 0).

    The first `history` chunks are re-prefilled history as after a context reset
    (docs/PROTOCOL.md, "Context policy"): each block is followed by KEEP_SILENCE, which is input
    there and never a target."""
    t = protocol.tokens
    ids: list[int] = list(protocol.prefix_ids)
    loss_at: list[int] = []  # positions whose next token is a target
    speak_at: list[int] = []
    pads: list[list[int]] = []
    block_tail = [t["AUDIO_BEGIN"]] + [t["PAD"]] * VECTORS_PER_CHUNK + [t["ASSISTANT"]]
    for k, label in enumerate(labels):
        if k < history and label >= 0:
            raise ValueError(f"history chunk {k} has a reply: a reset re-prefills only chunks heard since the last reply")
        answer = [t["KEEP_SILENCE"]] if label < 0 else list(protocol.reply_ids[int(label)])
        if len(ids) + BLOCK + len(answer) > max_tokens:
            break
        start = len(ids)
        ids += block_tail
        pads.append(list(range(start + 1, start + 1 + VECTORS_PER_CHUNK)))
        assistant = len(ids) - 1
        if label >= 0:
            speak_at.append(assistant)
        if k >= history:
            loss_at += range(assistant, assistant + len(answer))
        ids += answer
    if len(pads) <= history:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for a chunk after the prefix and {history} history chunks")
    ids_arr = np.asarray(ids, np.int64)
    targets = np.full(len(ids), -100, np.int64)
    loss_idx = np.asarray(loss_at, np.int64)
    targets[loss_idx] = ids_arr[loss_idx + 1]
    speak = np.zeros(len(ids), bool)
    speak[np.asarray(speak_at, np.int64)] = True
    return Sequence(ids_arr, targets, speak, np.asarray(pads, np.int64), len(pads))
