"""The model's protocol constants, defined once (docs/PROTOCOL.md explains each of them).

The audio constants come from the C++ core, which is built for exactly these values; every
other module, the exporter and the demo trainer included, imports them from here.
"""
from __future__ import annotations

from ._core import CHUNK_SAMPLES, HOP, N_MELS, SAMPLE_RATE

# --- audio front end (PROTOCOL.md, "Front end" and "Chunks") ------------------------------
N_FFT = 400
FRAMES_PER_CHUNK = CHUNK_SAMPLES // HOP  # 40 mel frames per chunk
VECTORS_PER_CHUNK = 10  # encoder output vectors per chunk (one per 40 ms)
CHUNK_SECONDS = CHUNK_SAMPLES / SAMPLE_RATE  # 0.4
LOG_FLOOR = 1e-10
DYNAMIC_RANGE_LOG10 = 8.0  # the log-mel floor sits 80 dB below the running peak
# Input rates the runtime accepts and resamples from (PROTOCOL.md, "Front end"); others are refused.
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000

# --- token layout (PROTOCOL.md, "Prompt", "Listening step") ---------------------------------
BLOCK = VECTORS_PER_CHUNK + 2  # AUDIO_BEGIN, PAD x 10, ASSISTANT
STEP = BLOCK + 1  # the fed-back token (KEEP_SILENCE or TEXT_END) + a block

# Every named protocol token; SYSTEM is the same id as TEXT_BEGIN.
TOKEN_NAMES = (
    "USER", "ASSISTANT", "KEEP_SILENCE", "PAD", "ONLINE", "OFFLINE", "ENGLISH",
    "HAPPY", "SAD", "ANGRY", "SURPRISE", "NORMAL", "URGENT",
    "TEXT_END", "TEXT_BEGIN", "SYSTEM", "AUDIO_PAD", "AUDIO_BEGIN", "AUDIO_END",
)
EMOTION_NAMES = ("HAPPY", "SAD", "ANGRY", "SURPRISE", "NORMAL", "URGENT")
# Ids of the released checkpoint (PROTOCOL.md, "Token ids"); small checkpoints override them.
RELEASE_TOKENS = {
    "USER": 151601, "ASSISTANT": 151602, "KEEP_SILENCE": 151605, "PAD": 151608,
    "ONLINE": 151609, "OFFLINE": 151610, "ENGLISH": 151611, "HAPPY": 151614, "SAD": 151615,
    "ANGRY": 151616, "SURPRISE": 151617, "NORMAL": 151618, "URGENT": 151619,
    "TEXT_END": 151643, "TEXT_BEGIN": 151644, "SYSTEM": 151644, "AUDIO_PAD": 151646,
    "AUDIO_BEGIN": 151647, "AUDIO_END": 151648,
}
# The streaming prefix (PROTOCOL.md, "Prompt"): these four, the system prompt's tokens, TEXT_END.
PREFIX_HEAD = ("ONLINE", "ENGLISH", "SYSTEM", "TEXT_BEGIN")
RELEASE_SYSTEM_PROMPT = (
    "You are a helpful assistant. When there is no user text, if the audio contains a question, "
    "please answer it. If it is a sound effect, determine based on the sound whether help is needed."
)

# --- packages -------------------------------------------------------------------------------
PRECISIONS = ("fp32", "fp16", "int8", "int4")
MAX_REPLY_TOKENS = 512  # the reference's per-reply cap
