"""Errors the trainer reports as a clean message and exit code 2 (bad user data), never as a traceback."""

from __future__ import annotations


class DataError(Exception):
    """A problem with the user's inputs: a missing file, a missing column, an unusable folder."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def render(self) -> str:
        text = f"error: {self}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class ResumeError(DataError):
    """The run directory cannot be resumed with this spec or world size."""
