"""Every error listenloop raises on purpose is a subclass of `Error`, with a one-line message."""


class Error(Exception):
    """Base class of listenloop's errors."""


class AudioFormatError(Error, ValueError):
    """Audio that cannot be used: wrong dtype, shape or rate, unreadable or empty file."""


class ModelPackageError(Error):
    """A model package that is missing, corrupt, or does not match its manifest."""


class ProtocolError(Error):
    """The model emitted something the token protocol does not allow."""


class SessionClosedError(Error):
    """The session was closed; no more audio can be fed."""


class DeviceError(Error):
    """An audio device or execution provider that cannot be used."""


class CheckpointError(Error):
    """A checkpoint folder that is not in the release layout or disagrees with itself."""


class ExportError(Error):
    """Exporting a checkpoint to a model package failed."""
