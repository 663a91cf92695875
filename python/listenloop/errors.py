"""Every error listenloop raises on purpose is a subclass of `Error`, with a one-line message.

`Bounds` states the range a configuration number must lie in; every loader and option check
(package manifest, device profile, stream policy, sampling) uses it, so each refusal reads
the same: `<file or option>: <field> must be a finite number in [lo, hi], got <value>`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


class Error(Exception):
    """Base class of listenloop's errors."""


class AudioFormatError(Error, ValueError):
    """Audio that cannot be used: wrong dtype, shape or rate, unreadable or empty file."""


class ModelPackageError(Error):
    """A model package that is missing, corrupt, or does not match its manifest."""


class ProtocolError(Error):
    """The model emitted something the token protocol does not allow."""


class ModelOutputError(Error):
    """The model computed NaN or infinite numbers (encoder vectors or logits)."""


class SessionClosedError(Error):
    """The session was closed; no more audio can be fed."""


class DeviceError(Error):
    """An audio device or execution provider that cannot be used."""


class CapacityError(Error):
    """A new stream that does not fit: every slot of a model's shared KV cache is taken."""


class ConfigError(Error, ValueError):
    """A stream option (speak bias, sampling, threshold, reply cap, history) outside its range."""


class CheckpointError(Error):
    """A checkpoint folder that is not in the release layout or disagrees with itself."""


class ExportError(Error):
    """Exporting a checkpoint to a model package failed."""


def show(value, limit: int = 60) -> str:
    """A short, one-line rendering of a configuration value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral) and abs(int(value)).bit_length() > 128:
        return f"{'-' if value < 0 else ''}an integer of {abs(int(value)).bit_length()} bits"
    text = repr(value)
    text = " ".join(text.split())  # never a line break in a message
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bound_text(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Bounds:
    """A closed or half-open range for a number; `integer` asks for a whole number.

    Booleans are never numbers here, NaN and infinities never pass, and large integers are
    compared exactly (never converted to float).
    """

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        return (("(" if self.low_open else "[") + f"{_bound_text(self.low)}, {_bound_text(self.high)}"
                + (")" if self.high_open else "]"))

    @property
    def wants(self) -> str:
        return f"{'an integer' if self.integer else 'a finite number'} in {self}"

    def problem(self, value) -> str | None:
        """None when `value` lies in the range; otherwise 'must be ... in [lo, hi], got x'."""
        if not self.holds(value):
            return f"must be {self.wants}, got {show(value)}"
        return None

    def holds(self, value) -> bool:
        if isinstance(value, bool):  # (numpy booleans are not numbers.Real either)
            return False
        if self.integer:
            if not isinstance(value, numbers.Integral):
                return False
            value = int(value)
        else:
            if not isinstance(value, numbers.Real):
                return False
            if not isinstance(value, numbers.Integral):
                value = float(value)
                if not math.isfinite(value):
                    return False
            else:
                value = int(value)
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below
