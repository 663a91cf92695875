"""Turning reply tokens into text safely while they stream (docs/PROTOCOL.md, "Reply").

- Bytes are decoded incrementally and an incomplete UTF-8 tail is held back, so a character
  split across BPE tokens is never emitted as U+FFFD or half-sent.
- Control ids are handled by id: an emotion first token becomes the reply's emotion; any
  other protocol id inside a reply is dropped from the text and counted.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def byte_level_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: the character the ByteLevel pre-tokenizer writes for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, chars))
    return tuple(chr(by_byte[b]) for b in range(256))


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict:
    """Inverse of the byte-level alphabet: character -> byte."""
    return {ch: b for b, ch in enumerate(byte_level_alphabet())}


def _is_byte_level(tokenizer_json: dict) -> bool:
    decoder = tokenizer_json.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


class TokenBytes:
    """Maps token ids to the raw bytes they stand for."""

    def __init__(self, tokenizer_path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_path)
        self.tokenizer = Tokenizer.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
        self.byte_level = _is_byte_level(spec)
        self.special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self._table = _unicode_to_byte()

    def __call__(self, token_id: int) -> bytes:
        if token_id in self.special:
            return b""  # decoding skips special tokens
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self.byte_level and all(ch in self._table for ch in piece):
            return bytes(self._table[ch] for ch in piece)
        # Not byte-level (or an added token): the tokenizer's own text for it.
        return self.tokenizer.decode([token_id], skip_special_tokens=True).encode("utf-8")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


class Utf8Stream:
    """Incremental UTF-8 decoder: feed bytes, get only complete characters back."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """End of reply: whatever is left (an incomplete tail becomes U+FFFD, once)."""
        return self._decoder.decode(b"", final=True)


@dataclass
class ReplyPiece:
    text: str
    token_ids: list


@dataclass
class ReplyText:
    """Accumulates one reply. `add(token)` returns text ready to show (possibly '')."""

    token_bytes: TokenBytes
    tokens: dict  # protocol name -> id
    emotions: dict  # emotion name -> id
    emotion: str | None = None
    filtered: int = 0  # off-protocol control ids dropped from the text
    text: str = ""
    _count: int = 0
    _pending_ids: list = field(default_factory=list)
    _stream: Utf8Stream = field(default_factory=Utf8Stream)

    def __post_init__(self):
        self._emotion_by_id = {v: k for k, v in self.emotions.items()}
        self._control_ids = set(self.tokens.values()) | set(self.emotions.values())

    def add(self, token: int) -> ReplyPiece:
        first = self._count == 0
        self._count += 1
        if token == self.tokens["TEXT_END"]:
            return ReplyPiece("", [])
        if first and token in self._emotion_by_id:
            self.emotion = self._emotion_by_id[token]
            return ReplyPiece("", [])
        if token in self._control_ids:
            self.filtered += 1
            return ReplyPiece("", [])
        self._pending_ids.append(token)
        return self._emit(self._stream.feed(self.token_bytes(token)))

    def finish(self) -> ReplyPiece:
        return self._emit(self._stream.flush())

    def _emit(self, text: str) -> ReplyPiece:
        if not text:
            return ReplyPiece("", [])
        ids, self._pending_ids = self._pending_ids, []
        self.text += text
        return ReplyPiece(text, ids)
