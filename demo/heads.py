"""Auxiliary heads on the audio encoder, used in training only and dropped at release.

The protocol's reply targets are sparse and reach the encoder only through the decoder; these
heads give it dense, direct labels:
- per chunk: what it mostly contains (tasks.CONTENT_CLASSES), from the mean of its 10 vectors;
- per whole item: which event, command or distractor it is, from the mean and max of all its
  chunks' vectors (the word that tells "lights on" from "lights off" sits in one chunk of
  several, so the per-chunk label alone is ambiguous);
- per spoken item: its phonemes (demo/phonemes.py), by CTC over the 10 vectors of each of its
  chunks in order, so that minimal pairs must be told apart by what was said (hybrid
  CTC/attention training, as in ESPnet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import phonemes, tasks


class EncoderHeads(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.content = nn.Linear(hidden, len(tasks.CONTENT_CLASSES))
        self.item = nn.Linear(2 * hidden, len(tasks.CONTENT_CLASSES))
        self.phoneme = nn.Linear(hidden, phonemes.N_UNITS)

    def content_logits(self, audio: torch.Tensor) -> torch.Tensor:
        """[N, 10, H] chunk vectors -> [N, classes]."""
        return self.content(audio.mean(dim=1))

    def item_logits(self, audio: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """One row per (first, end) chunk span of `audio`."""
        pooled = [torch.cat([audio[a:b].mean(dim=(0, 1)), audio[a:b].amax(dim=(0, 1))]) for a, b in spans.tolist()]
        return self.item(torch.stack(pooled))

    def ctc_loss(self, audio: torch.Tensor, spans: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss of the phoneme units `targets[j]` over span j's vectors, in time order."""
        frames = [audio[a:b].reshape(-1, audio.shape[-1]) for a, b in spans.tolist()]
        lengths = torch.tensor([len(f) for f in frames])
        padded = nn.utils.rnn.pad_sequence(frames)  # [T, S, H]
        log_probs = F.log_softmax(self.phoneme(padded).float(), dim=-1)
        flat = torch.tensor([u for t in targets for u in t], dtype=torch.long)
        return F.ctc_loss(log_probs, flat, lengths, torch.tensor([len(t) for t in targets]), blank=phonemes.BLANK,
                          reduction="mean", zero_infinity=True)
