"""User-facing errors. Every message says what went wrong *and* what to do about it."""

from __future__ import annotations


class AvatarError(Exception):
    """Base of every error the toolkit raises on purpose.

    ``hint`` is the action the user should take; it is appended to the message so that a
    traceback's last line is enough to fix the problem.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  -> {hint}")


class ConfigError(AvatarError):
    """A config file, key or value is wrong."""


class MissingFileError(AvatarError, FileNotFoundError):
    """A file or directory the user must provide is not there."""


class MissingWeightsError(MissingFileError):
    """A pretrained model directory is missing or incomplete."""


class MissingBodyModelError(MissingFileError):
    """Licensed body-model files (e.g. SMPL-X) are missing."""


class CorruptFileError(AvatarError):
    """A file exists but cannot be read: truncated, corrupt or of the wrong kind."""


class InputError(AvatarError, ValueError):
    """An argument has the wrong shape, type or value (non-finite, empty, out of range)."""


class BackendUnavailableError(AvatarError, RuntimeError):
    """A requested compute backend (gsplat, nerfacc CUDA ops) cannot run here."""
