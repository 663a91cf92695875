"""listenloop: an edge runtime for always-on audio language models.

    rt = listenloop.Runtime("path/to/model-package", profile="cpu")
    with rt.session() as s:
        s.accept_waveform(pcm, sample_rate=48000)
        for event in s.events(timeout=0.5):
            ...

Heavy modules (onnxruntime, the engine) load on first use; torch is never imported here.
"""
from __future__ import annotations

from .errors import (AudioFormatError, CheckpointError, DeviceError, Error, ExportError, ModelPackageError,
                     ProtocolError, SessionClosedError)
from .events import (AudioDropped, ContextReset, Decision, Event, Fault, ReplyEnded, ReplyStarted, Stats,
                     TextDelta)

__version__ = "0.1.0"

_LAZY = {"Runtime": "session", "Session": "session", "read_audio": "audio", "load_package": "package",
         "Engine": "engine"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'listenloop' has no attribute {name!r}")


__all__ = ["Runtime", "Session", "Engine", "read_audio", "load_package", "__version__",
           "Event", "Decision", "ReplyStarted", "TextDelta", "ReplyEnded", "AudioDropped", "ContextReset",
           "Fault", "Stats", "Error", "AudioFormatError", "ModelPackageError", "ProtocolError",
           "SessionClosedError", "DeviceError", "ExportError", "CheckpointError"]
