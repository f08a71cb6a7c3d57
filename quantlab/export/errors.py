"""The error every checkpoint reader raises for a bad checkpoint (one class, so callers and the
CLI can catch it without knowing which layout or which check failed)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, truncated, corrupt, inconsistent with its config,
    or of an unknown layout. The message names the file, the field or tensor, and the fix."""
