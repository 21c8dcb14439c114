"""The exceptions hertz-agents raises. Every message says what went wrong and what to do."""

from __future__ import annotations


class HertzError(Exception):
    """Base class of every error hertz-agents raises on purpose."""


class AudioInputError(HertzError, ValueError):
    """Audio that cannot be used: unreadable, empty, too short, NaN/inf, wrong shape or rate."""


class CheckpointError(HertzError):
    """Checkpoint files that are missing, corrupt, or do not match the configuration."""


class ModelNotFound(CheckpointError):
    """No checkpoint for the requested model name or path (the message says how to download it)."""


class EngineFull(HertzError):
    """Every session slot of the engine is taken (the message gives the limit)."""


class SessionClosed(HertzError):
    """The session was closed; open a new one to continue."""


__all__ = [
    "AudioInputError",
    "CheckpointError",
    "EngineFull",
    "HertzError",
    "ModelNotFound",
    "SessionClosed",
]
