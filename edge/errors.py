"""Errors with a stable code and a one-line human message.

The same ``code`` travels in protocol ``error`` messages, so a host can react to it
without parsing prose.
"""

from __future__ import annotations


class SottovoceError(Exception):
    """Base error: ``code`` is stable and machine-readable, ``str(err)`` is for people."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class BundleError(SottovoceError):
    """A bundle is malformed, tampered with, unsigned where a signature is required, or unsupported."""

    code = "bundle.invalid"


class SignatureError(BundleError):
    code = "bundle.signature"


class ModelFileError(SottovoceError):
    """A model file is missing or its content does not match the recipe/manifest hash."""

    code = "model.file"


class AudioInputError(SottovoceError):
    """The input audio cannot be read or converted to 16 kHz mono."""

    code = "audio.input"


class AudioDeviceError(SottovoceError):
    """An audio device is missing, unplugged, or refuses the requested format."""

    code = "audio.device"


class ConfigError(SottovoceError):
    """A board profile, recipe or option is unknown or invalid."""

    code = "config.invalid"
