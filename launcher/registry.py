"""Submitted jobs, for every backend: name -> backend, cluster id, run directory (SQLite).

Lives in `$MBL_HOME/registry.db`, else `$XDG_STATE_HOME/mbl/registry.db` (~/.local/state/mbl).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.backends.base import JobRef
from launcher.errors import NotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    backend TEXT NOT NULL,
    job_id TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    team TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    gpus INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name);
"""


def home() -> Path:
    if os.environ.get("MBL_HOME"):
        return Path(os.environ["MBL_HOME"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mbl"


@dataclass
class Record:
    id: int
    name: str
    backend: str
    job_id: str
    run_dir: str
    team: str
    kind: str
    gpus: int
    submitted_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> JobRef:
        return JobRef(self.backend, self.job_id, self.name, self.run_dir, dict(self.extra))


class Registry:
    def __init__(self, path: Path | None = None):
        self.path = path or home() / "registry.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.executescript(SCHEMA)

    def add(self, ref: JobRef, team: str = "", kind: str = "", gpus: int = 0) -> Record:
        with self._db:
            cur = self._db.execute(
                "INSERT INTO jobs (name, backend, job_id, run_dir, team, kind, gpus, submitted_at, extra)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ref.name, ref.backend, ref.job_id, ref.run_dir, team, kind, gpus, time.time(), json.dumps(ref.extra)),
            )
        return self.get(str(cur.lastrowid))

    def save_extra(self, record: Record, extra: dict[str, Any]) -> None:
        with self._db:
            self._db.execute("UPDATE jobs SET extra = ? WHERE id = ?", (json.dumps(extra), record.id))
        record.extra = dict(extra)

    def save_extras(self, updates: list[tuple[Record, dict[str, Any]]]) -> None:
        """save_extra of many records in one transaction (`mbl list` recording the end of many jobs)."""
        with self._db:
            self._db.executemany("UPDATE jobs SET extra = ? WHERE id = ?",
                                 [(json.dumps(extra), record.id) for record, extra in updates])
        for record, extra in updates:
            record.extra = dict(extra)

    def _rows(self, where: str = "", args: tuple = ()) -> list[Record]:
        rows = self._db.execute(
            "SELECT id, name, backend, job_id, run_dir, team, kind, gpus, submitted_at, extra FROM jobs "
            + where + " ORDER BY id DESC",
            args,
        ).fetchall()
        return [Record(*row[:-1], extra=json.loads(row[-1])) for row in rows]

    def list(self, backend: str | None = None, limit: int | None = None) -> list[Record]:
        rows = self._rows("WHERE backend = ?", (backend,)) if backend else self._rows()
        return rows[:limit] if limit else rows

    def get(self, key: str) -> Record:
        """A job by name (the newest of that name), by cluster job id, or by registry id (`#12` or `12`)."""
        for where, arg in (("WHERE name = ?", key), ("WHERE job_id = ?", key)):
            rows = self._rows(where, (arg,))
            if rows:
                return rows[0]
        digits = key.lstrip("#")
        if digits.isdigit():
            rows = self._rows("WHERE id = ?", (int(digits),))
            if rows:
                return rows[0]
        raise NotFound(f"no job {key!r} in the registry ({self.path})", hint="`mbl list` shows the submitted jobs")

    def close(self) -> None:
        self._db.close()
