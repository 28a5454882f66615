"""Sweep points: their enumeration (by index, in a fixed order) and the names derived from their overrides.

A stage of a pipeline (launcher/pipeline.py) runs one job per sweep point. The points of a `grid` are the
product of its value lists in the order written (the first key varies slowest), those of `points` the list
as written; point `i` is the same point on every load of the same file, so that a Slurm array task can pick
its point from SLURM_ARRAY_TASK_ID and a re-submission finds the run directory of each point again.

A point's label names its run directory: its overrides sorted by key, each as a short key and the value
(`lr3e-5-seed1`), readable and stable; a label that grows too long, or that two points would share, ends in
a hash of the overrides. Job names (DNS-1035 labels of at most NAME_MAX_LEN characters) derive from it.
Pure: no file system, no clock.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from typing import Any

from launcher.spec import NAME_MAX_LEN

# Short forms of the keys users sweep most; any other key is its last part (`train.lr` -> `lr`).
SHORT_KEYS = {"global_batch_size": "gbs", "micro_batch_size": "mbs", "max_steps": "steps",
              "warmup_steps": "warmup", "weight_decay": "wd", "mask_prob": "mask", "min_lr_ratio": "minlr"}
LABEL_MAX_LEN = 64
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The product of the grid's value lists, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def value_text(value: Any) -> str:
    """A value as it appears in a label: floats short (3e-5, 0.001), booleans lower-case, other characters
    that a file name should not hold replaced by '_'."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:g}").replace("e+", "e")
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    return _LABEL_CHARS.sub("_", text).strip("_") or "_"


def _digest(overrides: dict[str, Any], size: int = 8) -> str:
    blob = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:size]


def labels(points: list[dict[str, Any]]) -> list[str]:
    """One label per point (see the module's docstring), distinct within the list."""
    keys = sorted({k for p in points for k in p})
    short: dict[str, str] = {}
    for key in keys:
        last = key.rsplit(".", 1)[-1]
        short[key] = SHORT_KEYS.get(last, last)
    taken = list(short.values())
    for key in keys:  # two keys with the same short form: both spelled out
        if taken.count(short[key]) > 1:
            short[key] = key.replace(".", "_")
    out = []
    for point in points:
        text = "-".join(short[k] + value_text(point[k]) for k in sorted(point)) or "default"
        if len(text) > LABEL_MAX_LEN:
            text = text[:LABEL_MAX_LEN - 9].rstrip("-._") + "-" + _digest(point)
        out.append(text)
    # values that read the same once cleaned ("a/b" and "a_b"): those labels end in a hash
    return [t + "-" + _digest(p) if out.count(t) > 1 else t for t, p in zip(out, points)]


def job_name(*parts: str) -> str:
    """A DNS-1035 job name from `parts` joined with '-' (pipeline, stage, label): lower-case, '.' as 'p',
    other characters as '-'; cut to NAME_MAX_LEN with a hash of the whole when longer."""
    text = "-".join(p for p in parts if p).lower().replace(".", "p")
    text = re.sub(r"-+", "-", _NAME_CHARS.sub("-", text)).strip("-")
    if len(text) > NAME_MAX_LEN:
        digest = hashlib.sha256("/".join(parts).encode()).hexdigest()[:6]
        text = text[:NAME_MAX_LEN - 7].rstrip("-") + "-" + digest
    return text
