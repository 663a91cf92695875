"""/v1/pcm: binary frames of mono PCM in, one JSON text frame per listenloop event out.

Query: rate (Hz, default 16000), format (f32 | s16, little-endian), frames (raw | tagged),
key (API key), speak_bias (float). With frames=tagged every binary frame starts with a 4-byte
tag: b"MIC " (microphone) or b"PLAY" (the device's playback, the echo reference, placed right
after the previous playback on the microphone's clock). The server first sends
{"event": "Ready", ...}; a text frame {"type": "finish"} ends the input, and the server sends
every remaining event up to Finished, then closes. Bad input gets
{"event": "Error", "message": ...} and the connection goes on.
"""
from __future__ import annotations

import asyncio
import math

import numpy as np
from aiohttp import web

from ..audio import check_sample_rate
from ..errors import Error
from ..protocol import SAMPLE_RATE
from .connection import Connection, loads_object, quote
from .state import STATE, guard, json_error
from .transport import AiohttpChannel, CloseCode

FORMATS = {"f32": np.dtype("<f4"), "s16": np.dtype("<i2")}
# frames=tagged: the tag opens every binary frame. Opt-in, since without it any 4 bytes are
# valid samples and an old client's microphone frame could be taken for playback.
FRAMES = ("raw", "tagged")
MICROPHONE_TAG, PLAYBACK_TAG = b"MIC ", b"PLAY"
TAG_BYTES = 4
FINISH_TIMEOUT_S = 300.0


class PcmConnection(Connection):
    def __init__(self, channel, state, rate: int, dtype: np.dtype, policy: dict, tagged: bool = False):
        super().__init__(channel, state)
        self.rate = rate
        self.dtype = dtype
        self.policy = policy
        self.tagged = tagged
        self._finishing = False

    async def on_open(self) -> None:
        await self.send({"event": "Ready", "model": self.state.model_name, "sample_rate": SAMPLE_RATE,
                         "session": self.id})

    async def on_error(self, code: str, message: str, client_event_id=None, param=None) -> None:
        await self.send({"event": "Error", "code": code, "message": message})

    async def on_binary(self, data: bytes) -> None:
        if self._finishing:
            await self.on_error("input_finished", "input was finished; open a new connection for more audio")
            return
        accept, microphone = self.session.accept_waveform, True
        if self.tagged:
            tag, data = bytes(data[:TAG_BYTES]), data[TAG_BYTES:]
            if tag == PLAYBACK_TAG:
                accept, microphone = self.session.accept_playback, False
            elif tag != MICROPHONE_TAG:
                await self.on_error("invalid_tag", f"a frame must start with {MICROPHONE_TAG!r} or {PLAYBACK_TAG!r} "
                                    f"(frames=tagged), got {quote(tag)}")
                return
        size = self.dtype.itemsize
        if len(data) % size:
            await self.on_error("invalid_audio_length", f"a frame of {len(data)} bytes is not a whole number of "
                                f"{size}-byte samples")
            return
        if not data:
            return
        try:
            accept(np.frombuffer(data, self.dtype), self.rate, block=False)
        except Error as exc:
            await self.on_error("invalid_audio", str(exc))
            return
        if microphone:
            self.audio_received()

    async def on_text(self, text: str) -> None:
        message, problem = loads_object(text)
        if problem is None and message.get("type") != "finish":
            problem = f"unknown message {quote(message.get('type'))}: the only text message is {{\"type\": \"finish\"}}"
        if problem is not None:
            await self.on_error("invalid_message", problem)
            return
        if not self._finishing:
            self._finishing = True
            asyncio.create_task(self._finish())

    async def _finish(self) -> None:
        session = self.session
        try:
            await asyncio.get_running_loop().run_in_executor(None, session.finish, FINISH_TIMEOUT_S)
        except Error as exc:
            await self.on_error("server_error", str(exc))
            self._done = True
            await self._close(CloseCode.INTERNAL_ERROR, "finish failed")

    async def on_event(self, event) -> None:
        await self.send(event.to_dict())
        if event.kind == "Finished":
            self._done = True
            await self._close(CloseCode.OK, "finished")


def _query_options(query) -> tuple[int, np.dtype, dict, bool]:
    """(rate, sample dtype, policy, tagged frames) from the query string; ValueError with the reason."""
    try:
        rate = int(query.get("rate", SAMPLE_RATE))
    except ValueError:
        raise ValueError(f"rate must be an integer number of Hz, got {quote(query.get('rate'))}") from None
    rate = check_sample_rate(rate)
    fmt = query.get("format", "f32")
    if fmt not in FORMATS:
        raise ValueError(f"format must be f32 or s16, got {quote(fmt)}")
    frames = query.get("frames", FRAMES[0])
    if frames not in FRAMES:
        raise ValueError(f"frames must be raw or tagged, got {quote(frames)}")
    policy = {}
    if "speak_bias" in query:
        try:
            bias = float(query["speak_bias"])
        except ValueError:
            bias = math.nan
        if not math.isfinite(bias):
            raise ValueError(f"speak_bias must be a finite number, got {quote(query['speak_bias'])}")
        policy["speak_bias"] = bias
    return rate, FORMATS[fmt], policy, frames == "tagged"


async def pcm_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        rate, dtype, policy, tagged = _query_options(request.query)
    except (ValueError, Error) as exc:
        refusal = guard(request, counts=False)
        return refusal if refusal is not None else json_error(400, str(exc), "invalid_option")
    refusal = guard(request, counts=True)
    if refusal is not None:
        return refusal
    return await PcmConnection(AiohttpChannel(request), state, rate, dtype, policy, tagged).run()
