"""Progress of long steps: bars and spinners on a terminal, plain lines in CI and logs, nothing for --json.

    from ppsehr.common.progress import Progress

    with Progress(json_output=args.json) as progress:
        with progress.task("site measurement", total=len(sites)) as t:
            for site in sites:
                ...
                t.advance(note=f"{site} answered")
        with progress.task("model fitting"):       # no total: a spinner
            model = estimate(...)
        progress.log("release written to ...")

    # or follow a release's events (dicts with "stage" and "message", optionally "done"/"total"):
    with Progress(json_output=args.json) as progress:
        follow(..., on_event=progress.event)

Mode (`Progress.mode`): "quiet" with json_output; otherwise PPSEHR_PROGRESS (tty | plain | quiet) if set;
"plain" when CI is set or the stream is not a terminal (TERM=dumb counts as none); else "tty".
Plain mode prints a line when a step starts, at each quarter of a step with a total, and when it
ends (with its duration); it never redraws. Progress goes to stderr unless another stream is given,
so stdout stays clean for results.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Mapping

MODES = ("tty", "plain", "quiet")
_FALSE = ("", "0", "false", "no")


def progress_mode(json_output: bool = False, stream: IO[str] | None = None,
                  env: Mapping[str, str] | None = None) -> str:
    """Which kind of progress output suits this run (see the module docstring)."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    if json_output:
        return "quiet"
    forced = env.get("PPSEHR_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    if env.get("CI", "").strip().lower() not in _FALSE:
        return "plain"
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "tty" if tty and env.get("TERM") != "dumb" else "plain"


class Task:
    """One step. `advance`/`update` move it; leaving the `with` block (or `finish`) ends it."""

    def __init__(self, progress: "Progress", name: str, total: float | None, announce: bool = True):
        self.progress, self.name, self.total, self.announce = progress, name, total, announce
        self.completed = 0.0
        self.note = ""
        self.started = time.monotonic()
        self.finished = False
        self._quarter = 0
        self._id = None
        if progress._rich is not None:
            self._id = progress._rich.add_task(_escape(name), total=total, count=self._count())
        if announce:
            progress._plain(f"{name} ..." if total is None else f"{name}: 0/{_fmt(total)} ...")

    def advance(self, amount: float = 1, note: str | None = None) -> None:
        self.update(completed=self.completed + amount, note=note)

    def update(self, completed: float | None = None, total: float | None = None, note: str | None = None) -> None:
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        if note is not None:
            self.note = note
        if self._id is not None:
            desc = _escape(self.name) + (f" [dim]{_escape(self.note)}[/dim]" if self.note else "")
            self.progress._rich.update(self._id, completed=self.completed, total=self.total, description=desc,
                                       count=self._count())
        elif self.total:
            quarter = min(int(4 * self.completed / self.total), 4)
            if self.announce and 0 < quarter < 4 and quarter > self._quarter:
                self.progress._plain(f"{self.name}: {_fmt(self.completed)}/{_fmt(self.total)}"
                                     + (f" ({self.note})" if self.note else ""))
            self._quarter = max(self._quarter, quarter)

    def finish(self, note: str | None = None, ok: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        if note is not None:
            self.note = note
        seconds = time.monotonic() - self.started
        if self._id is not None:
            if ok and self.total is None:  # a spinner: show it as complete
                self.progress._rich.update(self._id, total=1, completed=1)
            elif not ok:
                self.progress._rich.update(self._id, description=f"[red]✗ {_escape(self.name)} failed[/red]")
            self.progress._rich.stop_task(self._id)
        done = f"{_fmt(self.completed)}/{_fmt(self.total)}, " if self.total else ""
        if self.announce or not ok:
            self.progress._plain(f"{self.name}: {'done' if ok else 'FAILED'} ({done}{seconds:.1f} s)"
                                 + (f" {self.note}" if self.note else ""))

    def _count(self) -> str:
        return f"{_fmt(self.completed)}/{_fmt(self.total)}" if self.total else ""

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.finish(ok=exc_type is None)


class Progress:
    """Progress display for one command; use as a context manager."""

    def __init__(self, json_output: bool = False, stream: IO[str] | None = None, mode: str | None = None,
                 env: Mapping[str, str] | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.mode = mode or progress_mode(json_output, self.stream, env)
        if self.mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {self.mode!r}")
        self._rich = None
        self._stage: tuple[str, Task] | None = None
        if self.mode == "tty":
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, SpinnerColumn, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._rich = RichProgress(SpinnerColumn(finished_text="[green]✓[/green]"),
                                      TextColumn("{task.description}"), BarColumn(bar_width=28),
                                      TextColumn("[green]{task.fields[count]}"), TimeElapsedColumn(), console=console,
                                      transient=False)

    def task(self, name: str, total: float | None = None, announce: bool = True) -> Task:
        """Start a step: a bar if `total` is known, else a spinner. Plain mode prints its start, quarters
        and end unless announce=False (then only a failure)."""
        return Task(self, name, total, announce)

    def log(self, message: str) -> None:
        """A line of its own (above the bars on a terminal); nothing in quiet mode."""
        if self._rich is not None:
            self._rich.console.print(_escape(message), highlight=False)
        else:
            self._plain(message)

    def event(self, ev: Mapping[str, Any]) -> None:
        """Follow pipeline events ({"stage", "message"}, optionally "done"/"total"): every message is a line;
        each new stage is a step (a spinner, or a bar with done/total) that ends when the stage changes."""
        stage, message = str(ev.get("stage", "progress")), str(ev.get("message", ""))
        if self._stage is not None and self._stage[0] != stage:
            self._stage[1].finish()
            self._stage = None
        if message:
            self.log(message)
        if stage == "done":
            return
        if self._stage is None:
            self._stage = (stage, self.task(stage, ev.get("total"), announce=False))
        if "done" in ev or "total" in ev:
            self._stage[1].update(completed=ev.get("done"), total=ev.get("total"))

    def _plain(self, line: str) -> None:
        if self.mode == "plain":
            print(f"[{time.strftime('%H:%M:%S')}] {line}", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._stage is not None:
            self._stage[1].finish(ok=exc_type is None)
            self._stage = None
        if self._rich is not None:
            self._rich.stop()


def _fmt(x: float | None) -> str:
    return "?" if x is None else (str(int(x)) if float(x).is_integer() else f"{x:.3g}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
