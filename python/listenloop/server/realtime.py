"""/v1/realtime: the OpenAI Realtime protocol over a listenloop Session, text replies only.

The model decides when to reply: each reply it starts becomes one response
(input_audio_buffer.committed and the user's audio item, response.created,
response.output_item.added, conversation.item.added, response.content_part.added, text deltas,
response.output_text.done, response.content_part.done, response.output_item.done,
conversation.item.done, response.done). Event names and
shapes follow the GA Realtime API by default, and the beta API (response.text.delta,
response.text.done, beta session and item shapes) for clients that send
`OpenAI-Beta: realtime=v1` or ask for it with session.listenloop.beta_event_names.
One client event is listenloop's own: listenloop.playback.append, the device's playback as the
echo reference (docs/SERVE.md, "Playback: the echo reference").
"""
from __future__ import annotations

import base64
import binascii
import math
import re

import numpy as np
from aiohttp import web

from ..errors import Error
from .connection import Connection, loads_object, new_id, quote
from .state import STATE, guard
from .transport import AiohttpChannel

RATES = (16000, 24000)
DEFAULT_RATE = 24000
LISTENLOOP_OPTIONS = ("speak_bias", "events", "beta_event_names")
# listenloop events sent as listenloop.* when session.listenloop.events is on; the drop
# reports are always sent, since they mean the client lost audio or events.
OWN_EVENTS = {"Decision": "decision", "ContextReset": "context_reset", "AudioDropped": "audio_dropped",
              "AudioClipped": "audio_clipped", "EventsDropped": "events_dropped", "Stats": "stats",
              "Fault": "fault"}
ALWAYS_SENT = ("AudioDropped", "EventsDropped")


class BadRequest(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class _Reply:
    """The response being streamed."""

    def __init__(self, emotion):
        self.response_id = new_id("resp")
        self.item_id = new_id("item")
        self.previous_item_id: str | None = None
        self.emotion = emotion
        self.parts: list[str] = []
        self.cancelled = False


class RealtimeConnection(Connection):
    def __init__(self, channel, state, beta: bool):
        super().__init__(channel, state)
        self.beta = beta
        self.rate = DEFAULT_RATE
        self.events_on = False
        self.audio_fed = False
        self.reply: _Reply | None = None
        self.conversation_id = new_id("conv")
        self.last_item_id = None

    # -- sending helpers ------------------------------------------------------------------

    async def emit(self, type_: str, **fields) -> bool:
        return await self.send({"type": type_, "event_id": new_id("event"), **fields})

    async def on_error(self, code: str, message: str, client_event_id=None, param=None) -> None:
        await self.emit("error", error={"type": "invalid_request_error" if code != "server_error" else "server_error",
                                        "code": code, "message": message, "param": param,
                                        "event_id": client_event_id})

    async def on_going_away(self, reason: str) -> None:
        await self.emit("error", error={"type": "server_error", "code": "server_shutting_down",
                                        "message": f"{reason}: the connection is closing; reconnect to continue",
                                        "param": None, "event_id": None})

    def session_object(self) -> dict:
        own = {"speak_bias": self.policy.get("speak_bias"), "events": self.events_on,
               "beta_event_names": self.beta}
        if self.beta:  # the beta schema allows only OpenAI's model names: ours goes under listenloop
            return {"id": self.id, "object": "realtime.session", "modalities": ["text"],
                    "input_audio_format": "pcm16", "turn_detection": None, "tools": [], "tool_choice": "none",
                    "listenloop": {**own, "model": self.state.model_name, "input_sample_rate": self.rate}}
        return {"type": "realtime", "object": "realtime.session", "id": self.id, "model": self.state.model_name,
                "output_modalities": ["text"], "tools": [], "tool_choice": "none",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.rate}, "turn_detection": None,
                                    "transcription": None, "noise_reduction": None}},
                "listenloop": own}

    def response_object(self, reply: _Reply, status: str, output: list, status_details=None) -> dict:
        response = {"id": reply.response_id, "object": "realtime.response", "status": status,
                    "status_details": status_details, "output": output, "conversation_id": self.conversation_id,
                    "metadata": {"emotion": reply.emotion} if reply.emotion else None, "usage": None,
                    "max_output_tokens": "inf"}
        response["modalities" if self.beta else "output_modalities"] = ["text"]
        return response

    def item_object(self, reply: _Reply, status: str, text: str | None) -> dict:
        content = [] if text is None else [{"type": "text" if self.beta else "output_text", "text": text}]
        return {"id": reply.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    async def item_added(self, previous_item_id: str | None, item: dict) -> None:
        await self.emit("conversation.item.created" if self.beta else "conversation.item.added",
                        previous_item_id=previous_item_id, item=item)

    async def item_done(self, previous_item_id: str | None, item: dict) -> None:
        if not self.beta:  # the beta API has no conversation.item.done
            await self.emit("conversation.item.done", previous_item_id=previous_item_id, item=item)

    def _where(self, reply: _Reply) -> dict:
        return {"response_id": reply.response_id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}

    # -- connection -----------------------------------------------------------------------

    async def on_open(self) -> None:
        await self.emit("session.created", session=self.session_object())

    async def on_binary(self, data: bytes) -> None:
        await self.on_error("invalid_event", "binary frames are not part of the Realtime protocol: send audio as "
                            "input_audio_buffer.append with base64 pcm16")

    async def on_text(self, text: str) -> None:
        message, problem = loads_object(text)
        if problem is not None:
            await self.on_error("invalid_json", problem)
            return
        event_id = message.get("event_id")
        if event_id is not None and not isinstance(event_id, str):
            await self.on_error("invalid_type", "event_id must be a string", None, "event_id")
            return
        kind = message.get("type")
        handler = HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            if not isinstance(kind, str):
                await self.on_error("missing_required_parameter" if kind is None else "invalid_type",
                                    "a client event needs a string 'type'", event_id, "type")
            else:
                supported = ", ".join(sorted(HANDLERS))
                await self.on_error("unknown_event_type" if kind not in KNOWN_UNSUPPORTED else "unsupported_event",
                                    f"{quote(kind)} is not supported here; supported client events: {supported}",
                                    event_id, "type")
            return
        try:
            await handler(self, message)
        except BadRequest as exc:
            await self.on_error(exc.code, exc.message, event_id, exc.param)

    # -- client events --------------------------------------------------------------------

    async def _session_update(self, message: dict) -> None:
        session = message.get("session")
        if not isinstance(session, dict):
            raise BadRequest("missing_required_parameter" if session is None else "invalid_type",
                             "session.update needs a 'session' object", "session")
        rate = _requested_rate(session)
        own = session.get("listenloop", {})
        if own is None:
            own = {}
        if not isinstance(own, dict):
            raise BadRequest("invalid_type", "session.listenloop must be an object", "session.listenloop")
        unknown = sorted(set(own) - set(LISTENLOOP_OPTIONS))
        if unknown:
            raise BadRequest("unknown_parameter", f"unknown session.listenloop option {quote(unknown[0])}; known: "
                             f"{', '.join(LISTENLOOP_OPTIONS)}", f"session.listenloop.{unknown[0]}")
        for flag in ("events", "beta_event_names"):
            if flag in own and not isinstance(own[flag], bool):
                raise BadRequest("invalid_type", f"session.listenloop.{flag} must be true or false",
                                 f"session.listenloop.{flag}")
        policy = dict(self.policy)
        if "speak_bias" in own:
            bias = own["speak_bias"]
            if bias is None:
                policy.pop("speak_bias", None)
            elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
                raise BadRequest("invalid_type", f"session.listenloop.speak_bias must be a finite number, got "
                                 f"{quote(bias)}", "session.listenloop.speak_bias")
            else:
                policy["speak_bias"] = float(bias)
        if policy != self.policy:
            if self.audio_fed:
                raise BadRequest("invalid_value", "speak_bias can be set only before the first audio of a "
                                 "connection", "session.listenloop.speak_bias")
            try:
                self.open_session(**policy)
            except Error as exc:
                raise BadRequest("invalid_value", str(exc), "session.listenloop.speak_bias") from None
        if rate is not None:
            self.rate = rate
        self.events_on = own.get("events", self.events_on)
        self.beta = own.get("beta_event_names", self.beta)
        await self.emit("session.updated", session=self.session_object())

    async def _append(self, message: dict) -> None:
        pcm = _pcm16(message)
        if pcm is None:
            return
        try:
            self.session.accept_waveform(pcm, self.rate, block=False)
        except Error as exc:
            raise BadRequest("invalid_audio", str(exc), "audio") from None
        self.audio_fed = True
        self.audio_received()

    async def _playback_append(self, message: dict) -> None:
        """The device's playback, the echo reference: pcm16 at the input rate, placed on the
        microphone's clock (Session.accept_playback; `at`: a 16 kHz microphone position)."""
        at = message.get("at")
        if at is not None and (isinstance(at, bool) or not isinstance(at, int)):
            raise BadRequest("invalid_type", f"'at' must be an integer microphone sample position, got {quote(at)}",
                             "at")
        if at is not None and at < 0:
            raise BadRequest("invalid_value", f"'at' must be >= 0, got {at}", "at")
        pcm = _pcm16(message)
        if pcm is None:
            return
        try:
            self.session.accept_playback(pcm, self.rate, at=at, block=False)
        except Error as exc:
            raise BadRequest("invalid_audio", str(exc), "audio") from None
        self.audio_fed = True  # a new session (speak_bias) would lose the reference placed so far

    async def _clear(self, message: dict) -> None:
        await self.emit("input_audio_buffer.cleared")

    async def _commit(self, message: dict) -> None:
        await self._committed()

    async def _committed(self) -> None:
        """A commit adds the user's audio to the conversation as one item, complete at once."""
        item_id, previous = new_id("item"), self.last_item_id
        self.last_item_id = item_id
        await self.emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        item = _user_audio_item(item_id)
        await self.item_added(previous, item)
        await self.item_done(previous, item)

    async def _cancel(self, message: dict) -> None:
        reply = self.reply
        wanted = message.get("response_id")
        if wanted is not None and not isinstance(wanted, str):
            raise BadRequest("invalid_type", "response_id must be a string", "response_id")
        if reply is None or reply.cancelled or (wanted is not None and wanted != reply.response_id):
            raise BadRequest("response_cancel_not_active", "there is no active response to cancel"
                             + (f" with id {quote(wanted)}" if wanted else ""), "response_id")
        reply.cancelled = True
        await self._end(reply, "cancelled", {"type": "cancelled", "reason": "client_cancelled"})

    async def _create(self, message: dict) -> None:
        """Accepted: the model decides when it replies; its next reply is the response."""
        response = message.get("response")
        if response is not None and not isinstance(response, dict):
            raise BadRequest("invalid_type", "response must be an object", "response")

    # -- session events -------------------------------------------------------------------

    async def on_event(self, event) -> None:
        kind = event.kind
        if kind in OWN_EVENTS and (self.events_on or kind in ALWAYS_SENT):
            data = event.to_dict()
            del data["event"]
            await self.emit(f"listenloop.{OWN_EVENTS[kind]}", **data)
        if kind == "Decision" and event.spoke:
            await self._committed()
        elif kind == "ReplyStarted":
            await self._start(event.emotion)
        elif kind == "TextDelta":
            reply = self.reply
            if reply is not None and not reply.cancelled:
                reply.parts.append(event.text)
                await self.emit("response.text.delta" if self.beta else "response.output_text.delta",
                                **self._where(reply), delta=event.text)
        elif kind == "ReplyEnded":
            reply, self.reply = self.reply, None
            if reply is not None and not reply.cancelled:
                if event.truncated:
                    await self._end(reply, "incomplete", {"type": "incomplete", "reason": "max_output_tokens"})
                else:
                    await self._end(reply, "completed", None)

    async def _start(self, emotion) -> None:
        reply = self.reply = _Reply(emotion)
        reply.previous_item_id, self.last_item_id = self.last_item_id, reply.item_id
        item = self.item_object(reply, "in_progress", None)
        await self.emit("response.created", response=self.response_object(reply, "in_progress", []))
        await self.emit("response.output_item.added", response_id=reply.response_id, output_index=0, item=item)
        await self.item_added(reply.previous_item_id, item)
        await self.emit("response.content_part.added", **self._where(reply), part={"type": "text", "text": ""})

    async def _end(self, reply: _Reply, status: str, details) -> None:
        text = "".join(reply.parts)
        item_status = "completed" if status == "completed" else "incomplete"
        await self.emit("response.text.done" if self.beta else "response.output_text.done", **self._where(reply),
                        text=text)
        await self.emit("response.content_part.done", **self._where(reply), part={"type": "text", "text": text})
        item = self.item_object(reply, item_status, text)
        await self.emit("response.output_item.done", response_id=reply.response_id, output_index=0, item=item)
        await self.item_done(reply.previous_item_id, item)
        await self.emit("response.done", response=self.response_object(reply, status, [item], details))


def _user_audio_item(item_id: str) -> dict:
    """The user message a commit adds: its audio, which listenloop does not transcribe."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}]}


def _pcm16(message: dict) -> np.ndarray | None:
    """The samples of a message's base64 pcm16 'audio' (None if empty); BadRequest if unusable."""
    audio = message.get("audio")
    if not isinstance(audio, str):
        raise BadRequest("missing_required_parameter" if audio is None else "invalid_type",
                         f"{message['type']} needs 'audio': base64 pcm16", "audio")
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("invalid_base64", "'audio' is not valid base64", "audio") from None
    if len(raw) % 2:
        raise BadRequest("invalid_audio_length", f"{len(raw)} bytes of pcm16 is not a whole number of 2-byte "
                         "samples", "audio")
    return np.frombuffer(raw, "<i2") if raw else None


def _requested_rate(session: dict) -> int | None:
    """The input rate a session.update asks for (GA audio.input.format or beta
    input_audio_format), None if it does not say; BadRequest if unsupported."""
    rate = None
    if "input_audio_format" in session:
        fmt = session["input_audio_format"]
        if fmt != "pcm16":
            raise BadRequest("unsupported_audio_format", f"input_audio_format {quote(fmt)} is not supported; use "
                             "pcm16", "session.input_audio_format")
        rate = DEFAULT_RATE
    audio = session.get("audio")
    if audio is None:
        return rate
    if not isinstance(audio, dict):
        raise BadRequest("invalid_type", "session.audio must be an object", "session.audio")
    given = audio.get("input")
    if given is None:
        return rate
    if not isinstance(given, dict):
        raise BadRequest("invalid_type", "session.audio.input must be an object", "session.audio.input")
    fmt = given.get("format")
    if fmt is None:
        return rate
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise BadRequest("invalid_type", "session.audio.input.format must be an object with a 'type'",
                         "session.audio.input.format")
    if fmt["type"] != "audio/pcm":
        raise BadRequest("unsupported_audio_format", f"input format {quote(fmt['type'])} is not supported; use "
                         "audio/pcm", "session.audio.input.format.type")
    rate = fmt.get("rate", DEFAULT_RATE)
    if isinstance(rate, bool) or rate not in RATES:
        raise BadRequest("unsupported_sample_rate", f"input rate {quote(rate)} is not supported; use 24000 or "
                         "16000", "session.audio.input.format.rate")
    return int(rate)


HANDLERS = {
    "session.update": RealtimeConnection._session_update,
    "input_audio_buffer.append": RealtimeConnection._append,
    "input_audio_buffer.clear": RealtimeConnection._clear,
    "input_audio_buffer.commit": RealtimeConnection._commit,
    "response.cancel": RealtimeConnection._cancel,
    "response.create": RealtimeConnection._create,
    "listenloop.playback.append": RealtimeConnection._playback_append,
}
KNOWN_UNSUPPORTED = {"conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
                     "conversation.item.truncate", "output_audio_buffer.clear", "transcription_session.update"}
_BETA_HEADER = re.compile(r"(^|[;,\s])realtime\s*=\s*v1($|[;,\s])", re.IGNORECASE)


async def realtime_handler(request: web.Request) -> web.StreamResponse:
    refusal = guard(request, counts=True)
    if refusal is not None:
        return refusal
    return await RealtimeConnection(AiohttpChannel(request), request.app[STATE], beta_requested(request.headers)).run()


def beta_requested(headers) -> bool:
    """Whether the client asked for the beta event names (`OpenAI-Beta: realtime=v1`)."""
    return bool(_BETA_HEADER.search(headers.get("OpenAI-Beta", "")))
