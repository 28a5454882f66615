"""Following a job in the terminal: its log, quiet by default, under a live progress bar.

`mbl submit` (local, foreground) and `mbl logs -f` (every backend) print the job's log through `Follower`:

- Quiet: known-harmless library noise (`HARMLESS`: DeepSpeed's CPU accelerator notice, torch's deprecation
  warnings, torchrun's OMP_NUM_THREADS banner, Hugging Face progress bars) is kept out of the terminal; it
  stays in the log file. Every other line is printed once, not once per rank: a line equal to one of the
  last `DEDUP_WINDOW` lines (ignoring the srun task label, timestamps and process ids) is dropped. With
  `verbose`, every line as it is. The next attempt's log (`==> attempt-1.log <==`) starts afresh.
- On a terminal, a Rich progress bar below the scrolling log: step/total, percent, ETA, then the training
  loss, learning rate, tokens/s and the newest checkpoint (launcher/progress.py reads them from the run
  directory every second). Not on a terminal (piped, redirected): plain log lines only; the trainer's own
  step lines carry loss, lr and tokens/s there.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, TextIO

from launcher.progress import Tracker

# Known-harmless noise: (pattern, why it is harmless). A matching line is hidden unless --verbose.
HARMLESS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"Setting accelerator to CPU\. If you have GPU or other accelerator"),
     "DeepSpeed on a machine without GPUs (the local backend on CPU)"),
    (re.compile(r"deepspeed_shm_comm_op built successfully"), "DeepSpeed's CPU collectives, built once per rank"),
    (re.compile(r"FutureWarning: `torch\.distributed\.all_gather_into_tensor` is deprecated"),
     "DeepSpeed calls a torch API torch plans to rename; nothing to do for users"),
    (re.compile(r"run\.py:\d+\] (\*+|Setting OMP_NUM_THREADS environment variable .*|\s*)$"),
     "torchrun's banner: one thread per CPU rank is what mbl wants"),
    (re.compile(r"^(Loading weights|Writing model shards|Loading checkpoint shards|Map|Generating \w+ split)"
                r"(\s*\(num_proc=\d+\))?:\s+\d+%\|"),
     "Hugging Face progress bars (loading and saving models, datasets)"),
]
# A Python warning is two lines: "file:line: Category: message" and the source line, indented.
_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")
# Stripped before lines are compared: srun's task label, torch's rank prefix, timestamps, process ids.
_LABEL = re.compile(r"^\s*\d+: ")
_NOISE = re.compile(r"\[rank\d+\]:|\[?\d{4}-\d\d-\d\d[ T][\d:.,]+\]?|^[IWEF]\d{4} [\d:.]+ \d+ |\bpid[ =]\d+")
DEDUP_WINDOW = 500
_NEW_ATTEMPT = re.compile(r"^==> .* <==$")  # launcher/backends/slurm.py, moving on to the next attempt's log


class LineFilter:
    """Decides which log lines reach the terminal. `__call__(line)` -> the line to print, or None."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.hidden = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._skip_source = False

    def __call__(self, line: str) -> str | None:
        line = line.rstrip("\n")
        if self.verbose:
            return line
        if "\r" in line:  # a progress bar redrawn in place: its last state
            parts = [part for part in line.split("\r") if part.strip()]
            line = parts[-1] if parts else ""
        body = _LABEL.sub("", line, count=1)
        if _NEW_ATTEMPT.match(line):  # the next attempt's log (Slurm): its lines are new again
            self._seen.clear()
            return line
        if self._skip_source:
            self._skip_source = False
            if body.startswith("  "):  # the source line of a hidden warning
                self.hidden += 1
                return None
        if any(p.search(body) for p, _why in HARMLESS):
            self.hidden += 1
            self._skip_source = bool(_WARNING.match(body))
            return None
        if not body.strip():  # blank lines are what progress bars and banners leave behind
            self.hidden += 1
            return None
        key = _NOISE.sub("", body).strip()
        if key in self._seen:  # the same line from another rank (or a warning repeated)
            self._seen.move_to_end(key)
            self.hidden += 1
            self._skip_source = bool(_WARNING.match(body))
            return None
        self._seen[key] = None
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        return line


class _Info:
    """The line under the bar: loss, lr, tokens/s, the newest checkpoint, a stall warning."""

    def __init__(self, follower: "Follower"):
        self.follower = follower

    def __rich__(self) -> Any:
        from rich.text import Text

        words = self.follower.words
        text = Text("  ")
        for label, key in (("loss", "loss"), ("lr", "lr"), ("tok/s", "tokens_per_s"), ("ckpt step", "checkpoint")):
            if words.get(key):
                text.append(f"{label} ", style="dim")
                text.append(words[key] + "   ", style="bold" if key == "loss" else "")
        if words.get("note"):
            text.append(words["note"], style="bold yellow")
        return text


class Follower:
    """Prints a job's log lines (filtered) and, on a terminal, keeps a progress bar under them.

        with Follower(name, run_dir) as follow:
            for line in backend.logs(ref, follow=True):
                follow.line(line)
    """

    def __init__(self, name: str, run_dir: str | Path | None, verbose: bool = False, stream: TextIO | None = None,
                 live: bool | None = None, poll_seconds: float = 1.0):
        self.name = name
        self.filter = LineFilter(verbose)
        self.tracker = Tracker(run_dir)
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.poll_seconds = poll_seconds
        self.words: dict[str, str] = {}
        self._live: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- context ----------------------------------------------------------------------------------

    def __enter__(self) -> "Follower":
        if self.live:
            self._start_live()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the bar (it stays on screen as last drawn); say how many lines were hidden, once."""
        if self._live is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._update(final=True)
            self._live.stop()
            self._live = None
        if self.filter.hidden:
            print(f"mbl: {self.filter.hidden} known-harmless or repeated log line(s) not shown; --verbose shows "
                  "them (the log file keeps them)", file=sys.stderr, flush=True)
            self.filter.hidden = 0

    # ---- lines ------------------------------------------------------------------------------------

    def line(self, line: str) -> None:
        with self._lock:
            self.tracker.feed_line(line)
        shown = self.filter(line)
        if shown is None:
            return
        if self._live is not None:
            if "[mbl]" in shown:  # the trainer logged: new metrics are likely, show them now
                self._update()
            from rich.text import Text

            self._live.console.print(Text(shown), soft_wrap=True)
        else:
            self.stream.write(shown + "\n")
            self.stream.flush()

    # ---- the bar ----------------------------------------------------------------------------------

    def _start_live(self) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        console = Console(file=self.stream)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=None),
            TextColumn("{task.fields[steps]}"), TaskProgressColumn(),
            TextColumn("[dim]ETA[/dim] {task.fields[eta]}"), console=console, expand=True)
        self._task = self._progress.add_task(self.name, total=None, steps="", eta="?")
        self._live = Live(Group(self._progress, _Info(self)), console=console, refresh_per_second=4,
                          transient=False)
        self._live.start()
        self._update()
        self._thread = threading.Thread(target=self._poll, name="mbl-progress", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._update()

    def _update(self, final: bool = False) -> None:
        """Read what is new; `final`: the following ended (the job, or Ctrl-C), no ETA is counting down."""
        with self._lock:  # the poller thread and the log lines both update
            state = self.tracker.poll()
            self.words = state.words(time.time(), running=not final)
            if self._progress is None:
                return
            done = bool(state.total) and state.step == state.total
            eta = "0s" if done else "-" if final else self.words.get("eta") or "?"
            self._progress.update(self._task, total=state.total, completed=state.step or 0,
                                  steps=self.words.get("step") or "starting", eta=eta)
