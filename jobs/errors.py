"""Errors the trainer reports as a clean message and exit code 2 (bad user data), never as a traceback.

They belong to the launcher's error family (launcher.errors), so that both sides render them alike.
"""

from __future__ import annotations

from launcher.errors import MblError, UsageError


class DataError(UsageError):
    """A problem with the user's inputs: a missing file, a missing column, an unusable folder."""


class ResumeError(DataError):
    """The run directory cannot be resumed with this spec or world size."""


class ExportError(MblError):
    """An export that ran but whose result is wrong (ONNX output differs from PyTorch): exit code 1."""
