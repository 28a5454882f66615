"""One family of user-facing errors; the CLI turns them into a message and an exit code."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class MblError(Exception):
    """An error the user can act on. `exit_code` 2: bad input; 1: the operation failed."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def render(self) -> str:
        text = f"error: {self}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class UsageError(MblError):
    exit_code = 2


class NotFound(MblError):
    exit_code = 2


class BackendError(MblError):
    exit_code = 1


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][-A-Za-z0-9_]*")


@dataclass
class SpecProblem:
    source: str
    line: int | None
    path: tuple[str | int, ...]
    given: Any
    message: str

    def render(self) -> str:
        where = self.source + (f":{self.line}" if self.line else "")
        # a key as typed when it is a plain name; quoted when it is not (`env.'a b'`, an unknown key `'${x}'`)
        field = ".".join(str(p) if _PLAIN_KEY.fullmatch(str(p)) else repr(p) for p in self.path) or "(spec)"
        text = f"{where}: {field}: {self.message}"
        if self.given is not None and not isinstance(self.given, (dict, list)):
            text += f" (given: {self.given!r})"
        return text


class SpecError(UsageError):
    def __init__(self, problems: list[SpecProblem]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the spec")

    def render(self) -> str:
        return "\n".join("error: " + p.render() for p in self.problems)
