"""listenloop: an edge runtime for always-on audio language models.

    rt = listenloop.Runtime("path/to/model-package", profile="cpu")
    with rt.session() as s:
        s.accept_waveform(pcm, sample_rate=48000)
        for event in s.events(timeout=0.5):
            ...

Heavy modules (onnxruntime, the engine) load on first use; torch is never imported here.
"""
from __future__ import annotations

from .errors import (AudioFormatError, CheckpointError, ConfigError, DeviceError, Error, ExportError,
                     ModelOutputError, ModelPackageError, ProtocolError, SessionClosedError)
from .events import (AudioClipped, AudioDropped, ContextReset, Decision, Event, EventsDropped, Fault, Finished,
                     ReplyEnded, ReplyStarted, Stats, TextDelta)

__version__ = "0.1.0"

_LAZY = {"Runtime": "session", "Session": "session", "read_audio": "audio", "read_audio_blocks": "audio",
         "load_package": "package", "Engine": "engine", "Model": "model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'listenloop' has no attribute {name!r}")


__all__ = ["Runtime", "Session", "Model", "Engine", "read_audio", "read_audio_blocks", "load_package", "__version__",
           "Event", "Decision", "ReplyStarted", "TextDelta", "ReplyEnded", "AudioDropped", "AudioClipped",
           "ContextReset", "EventsDropped", "Fault", "Stats", "Finished",
           "Error", "AudioFormatError", "ConfigError", "ModelPackageError", "ModelOutputError", "ProtocolError",
           "SessionClosedError", "DeviceError", "ExportError", "CheckpointError"]
