"""A small byte-level BPE tokenizer with the protocol control tokens at known ids.

The release model reuses ids inside Qwen2's 151 643-token vocabulary; tiny and demo
checkpoints instead put the control tokens first (ids 0..n-1) as special tokens, train a few
hundred merges on their own text, and record the ids in `protocol_tokens.json`
(docs/PROTOCOL.md, "Token ids").
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Control token name -> the token string. TEXT_END/TEXT_BEGIN keep Qwen2's spelling; SYSTEM
# is the same id as TEXT_BEGIN, so it has no string of its own.
CONTROL_STRINGS = {
    "TEXT_END": "<|endoftext|>", "TEXT_BEGIN": "<|im_start|>",
    "USER": "<|user|>", "ASSISTANT": "<|assistant|>", "KEEP_SILENCE": "<|keep_silence|>",
    "PAD": "<|pad|>", "ONLINE": "<|online|>", "OFFLINE": "<|offline|>", "ENGLISH": "<|english|>",
    "HAPPY": "<|happy|>", "SAD": "<|sad|>", "ANGRY": "<|angry|>", "SURPRISE": "<|surprise|>",
    "NORMAL": "<|normal|>", "URGENT": "<|urgent|>", "AUDIO_PAD": "<|audio_pad|>",
    "AUDIO_BEGIN": "<|audio_begin|>", "AUDIO_END": "<|audio_end|>",
}


def build_tokenizer(texts, vocab_size: int = 512) -> tuple[Tokenizer, dict]:
    """Train a byte-level BPE on `texts`; return it and the protocol map name -> id.

    Every byte stays encodable (the 256-symbol byte alphabet is always in the vocabulary), so
    any string round-trips. Control tokens are special tokens at ids 0..17.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("build_tokenizer needs at least one training string")
    specials = list(CONTROL_STRINGS.values())
    if vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size {vocab_size} cannot hold {len(specials)} control tokens and 256 bytes")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokens = {name: tokenizer.token_to_id(text) for name, text in CONTROL_STRINGS.items()}
    tokens["SYSTEM"] = tokens["TEXT_BEGIN"]
    return tokenizer, tokens


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of plain text, without any added special tokens (no BOS, no EOS)."""
    return tokenizer.encode(text, add_special_tokens=False).ids
