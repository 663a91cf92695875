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

from .errors import ModelPackageError


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
    if not isinstance(decoder, dict):
        return False
    inner = decoder.get("decoders") or []
    kinds = [decoder.get("type")] + [d.get("type") for d in inner if isinstance(d, dict)]
    return "ByteLevel" in kinds


def _special_ids(tokenizer_json: dict) -> frozenset:
    added = tokenizer_json.get("added_tokens") or []
    return frozenset(t["id"] for t in added
                     if isinstance(t, dict) and t.get("special") and isinstance(t.get("id"), int))


@lru_cache(maxsize=4)
def _parse(path: str, mtime_ns: int, size: int) -> tuple:
    """(Tokenizer, byte-level?, special ids) of a tokenizer file; cached per file version, so a
    package check and the model share one parse. Raises ModelPackageError (not cached)."""
    from tokenizers import Tokenizer

    def fail(problem: str) -> ModelPackageError:
        return ModelPackageError(f"{path}: tokenizer.file: {problem}")

    try:
        text = Path(path).read_bytes().decode("utf-8")
        spec = json.loads(text)
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise fail("not a Hugging Face tokenizers file (not UTF-8 JSON)") from None
    except RecursionError:
        raise fail("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer with too many digits
        raise fail(f"not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise fail("not a Hugging Face tokenizers file (no \"model\" object)")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a bad file
        detail = " ".join(str(exc).split())[:160]
        raise fail(f"not a Hugging Face tokenizers file ({detail})") from None
    if tokenizer.get_vocab_size(with_added_tokens=True) == 0:
        raise fail("the tokenizer has an empty vocabulary")
    return tokenizer, _is_byte_level(spec), _special_ids(spec)


class TokenBytes:
    """Maps token ids to the raw bytes they stand for.

    A file that is not a Hugging Face tokenizers JSON file raises one ModelPackageError line
    naming it."""

    def __init__(self, tokenizer_path):
        path = Path(tokenizer_path)
        try:
            stat = path.stat()
        except OSError as exc:
            raise ModelPackageError(f"{path}: tokenizer.file: cannot be read ({exc.strerror or exc})") from None
        self.tokenizer, self.byte_level, self.special = _parse(str(path), stat.st_mtime_ns, stat.st_size)
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
