"""The demo model's tokenizer: the exporter's small byte-level BPE (control tokens at ids
0..17, listenloop.export.tokenizer_build) trained on the system prompt and the reply texts, so
every reply is a handful of tokens. Saved as tokenizer.json + protocol_tokens.json
(DESIGN.md, "Protocol token ids")."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from listenloop.export.tokenizer_build import build_tokenizer, encode_text
from listenloop.protocol import TOKEN_NAMES

from . import tasks

VOCAB_SIZE = 448  # a multiple of 64, so the embedding table needs no padding rows


def corpus() -> list[str]:
    # Replies repeated so their words win the merges over the longer system prompt's.
    return [tasks.SYSTEM_PROMPT] * 2 + [r.text for r in tasks.REPLIES] * 4


def demo_tokenizer(folder: Path) -> tuple[Tokenizer, dict[str, int]]:
    """Build (or reload) the tokenizer in `folder`; returns it and the protocol ids."""
    folder = Path(folder)
    tok_path, ids_path = folder / "tokenizer.json", folder / "protocol_tokens.json"
    if tok_path.exists() and ids_path.exists():
        ids = json.loads(ids_path.read_text())
        return Tokenizer.from_file(str(tok_path)), {k: v for k, v in ids.items() if k in TOKEN_NAMES}
    tokenizer, tokens = build_tokenizer(corpus(), vocab_size=VOCAB_SIZE)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tok_path))
    ids_path.write_text(json.dumps(protocol_file(tokens), indent=1))
    return tokenizer, tokens


def protocol_file(tokens: dict[str, int]) -> dict:
    """Contents of protocol_tokens.json: the ids plus the system prompt."""
    return {**tokens, "system_prompt": tasks.SYSTEM_PROMPT}


def encoder_for(tokenizer: Tokenizer):
    """Plain text -> ids, no special tokens added (the layout adds the protocol's own)."""
    return lambda text: encode_text(tokenizer, text)
