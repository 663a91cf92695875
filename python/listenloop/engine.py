"""Engine: a Model and one DecoderStream in one object, for single-stream callers that drive
the protocol step by step themselves (the exporter's parity report, the demo's evaluation,
benchmarks of the bare decoder). Streaming audio goes through Runtime and Session instead.
"""
from __future__ import annotations

from .model import Model
from .stream import DecoderStream, ListenResult, SpeakStep

__all__ = ["Engine", "ListenResult", "SpeakStep"]


class Engine:
    """`Engine(package, profile, max_context, **policy)`: policy options as DecoderStream's."""

    def __init__(self, package_or_path=None, profile="cpu", max_context: int | None = None, **policy):
        self.model = Model(package_or_path, profile, max_context=max_context)
        self.stream: DecoderStream = self.model.stream(**policy)
        self.package, self.tokens, self.capacity = self.model.package, self.model.tokens, self.model.capacity
        self.encode = self.model.encode
        s = self.stream
        self.listen, self.speak, self.speak_step, self.end_reply = s.listen, s.speak, s.speak_step, s.end_reply
        self.reset, self.last_inputs = s.reset, s.last_inputs

    @property
    def profile(self):
        return self.model.profile

    @property
    def providers(self):
        return self.model.providers

    @property
    def position(self) -> int:
        return self.stream.position

    @property
    def speaking(self) -> bool:
        return self.stream.speaking

    @property
    def reply_truncated(self) -> bool:
        return self.stream.reply_truncated

    @property
    def speak_bias(self) -> float:
        return self.stream.policy.speak_bias

    @property
    def kv_cache(self):
        return self.stream.kv_cache

    def __repr__(self) -> str:
        return f"Engine({self.package.name!r}, providers={list(self.providers)}, position={self.position}/{self.capacity})"
