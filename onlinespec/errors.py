"""Named errors. Each one says what the caller did wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "OnlineSpecError",
    "InvalidRequestError",
    "VocabMismatchError",
    "ModelLoadError",
    "CheckpointError",
]


class OnlineSpecError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(OnlineSpecError, ValueError):
    """A generation request that cannot be served as asked (empty prompt, k < 1, ...)."""


class VocabMismatchError(OnlineSpecError, ValueError):
    """Target and drafter do not share a vocabulary, so drafted ids would mean other tokens."""


class ModelLoadError(OnlineSpecError, RuntimeError):
    """A model path or hub id that could not be loaded."""


class CheckpointError(OnlineSpecError):
    """A drafter version that must not be served: missing files, bad checksum, wrong shapes, NaNs."""
