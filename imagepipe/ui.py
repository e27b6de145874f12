"""Watching a run: reporters fed by the core's events.

- :class:`Board` folds events into one row per branch (O(1) per event); it is the model.
- :class:`LiveReporter` draws the board as a ``rich.live`` table at a fixed refresh rate,
  never per event, so thousands of events cost nothing on screen. Past
  ``FULL_TABLE_LIMIT`` branches it shows a summary, a progress bar with rate and ETA,
  and only the rows that are running, retrying or rejected.
- :class:`PlainReporter` writes one line per event, like the reference transcript, for
  pipes, CI and ``TERM=dumb``: no redraws, no escape codes.
- :class:`~imagepipe.service.QuietReporter` (no rich needed) prints nothing while it works.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from imagepipe.durable import ErrorInfo
from imagepipe.durable.events import (
    AttemptFailed,
    AttemptStarted,
    Event,
    PromiseQueued,
    PromiseRejectedEvent,
    PromiseReplayed,
    PromiseResolved,
    RunDraining,
)
from imagepipe.runs.batches import GroupProgress, RunBatches
from imagepipe.runs.model import BranchArgs, image_location
from imagepipe.runs.reporting import RunInfo
from imagepipe.text import escape_control, quoted

__all__ = [
    "FULL_TABLE_LIMIT",
    "Board",
    "LiveReporter",
    "PlainReporter",
    "Row",
    "batch_line",
    "batches_summary",
    "board_renderable",
]

FULL_TABLE_LIMIT = 20
ACTIVE_ROWS_SHOWN = 12
RATE_SAMPLE = 0.05  # seconds between samples of the settled count, for rate and ETA
REJECTED_ROWS_SHOWN = 4
STATE_STYLE = {
    "queued": "dim",
    "running": "cyan",
    "retrying": "yellow",
    "resolved": "green",
    "replayed": "blue",
    "rejected": "bold red",
    "pending": "magenta",  # in a stored run: neither settled nor running now
}
STATES = tuple(STATE_STYLE)


def failure_line(func: str, error: ErrorInfo, delay: float) -> str:
    """The reference's log line for a retry."""
    return f"Function '{func}' failed with '{error.message}' (retrying in {delay:g} secs)"


def draining_line(event: RunDraining) -> str:
    """What the user sees while a run that must stop lets its requests in flight end."""
    waiting = (
        f"waiting for the {event.in_flight} requests in flight"
        if event.in_flight != 1
        else "waiting for the request in flight"
    )
    if not event.in_flight:
        waiting = "nothing in flight"
    return f"Stopping, no new request: {event.reason}; {waiting}"


@dataclass(slots=True)
class Row:
    id: str
    label: str
    state: str = "queued"
    attempt: int = 0
    since: float = 0.0  # monotonic start of the current attempt or back-off
    retry_at: float | None = None
    error: str | None = None
    url: str | None = None
    #: the row of a prompt file the branch belongs to, if the run has one
    group: int | None = None


@dataclass
class Board:
    """Every branch's current state, folded from events.

    Rows are also kept per state (in arrival order), so that a frame of a huge run only
    touches the few rows that are running, retrying or rejected."""

    info: RunInfo | None = None
    rows: dict[str, Row] = field(default_factory=dict)
    by_state: dict[str, dict[str, Row]] = field(default_factory=lambda: {s: {} for s in STATES})
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    # (time, settled count) samples for the rate and ETA, at most one per RATE_SAMPLE
    settled_log: list[tuple[float, int]] = field(default_factory=list)
    #: for a run over a prompt file: each prompt's branches counted by state
    groups: dict[int, Counter[str]] = field(default_factory=dict)
    #: a run sent through a provider's batches: its batches as last polled
    batches: RunBatches | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {state: len(rows) for state, rows in self.by_state.items()}

    def _move(self, row: Row, state: str) -> None:
        del self.by_state[row.state][row.id]
        self.by_state[state][row.id] = row
        if row.group is not None:
            counts = self.groups[row.group]
            counts[row.state] -= 1
            counts[state] += 1
        row.state = state

    def add(self, row: Row) -> Row:
        self.rows[row.id] = row
        self.by_state[row.state][row.id] = row
        if row.group is not None:
            self.groups.setdefault(row.group, Counter())[row.state] += 1
        return row

    def _add(self, promise_id: str, args: dict[str, Any], state: str) -> Row:
        branch = BranchArgs.read(args)
        return self.add(Row(promise_id, branch.label, state, group=branch.prompt_index))

    @property
    def settled(self) -> int:
        return sum(len(self.by_state[s]) for s in ("resolved", "replayed", "rejected"))

    def apply(self, event: Event, now: float | None = None) -> Row:
        """Fold one event in. Called for every event of every branch, so it stays cheap."""
        now = time.monotonic() if now is None else now
        handler: Callable[[Board, Any, float], Row] = _HANDLERS[type(event)]
        return handler(self, event, now)

    def _on_queued(self, event: PromiseQueued, now: float) -> Row:
        row = self._add(event.id, event.args, "queued")
        row.attempt = event.attempts
        return row

    def _on_replayed(self, event: PromiseReplayed, now: float) -> Row:
        row = self._add(
            event.id, event.args, "replayed" if event.state == "resolved" else "rejected"
        )
        row.attempt = event.attempts
        row.url = _url(event.value)
        row.error = None if event.error is None else event.error.message
        return row

    def _on_started(self, event: AttemptStarted, now: float) -> Row:
        row = self.rows[event.id]
        self._move(row, "running")
        row.attempt, row.since, row.retry_at = event.attempt, now, None
        return row

    def _on_failed(self, event: AttemptFailed, now: float) -> Row:
        row = self.rows[event.id]
        row.error = event.error.message
        if event.retry_in is not None:
            self._move(row, "retrying")
            row.since, row.retry_at = now, now + event.retry_in
        return row

    def _on_resolved(self, event: PromiseResolved, now: float) -> Row:
        row = self.rows[event.id]
        self._settle(row, "resolved", now)
        row.url, row.attempt, row.error = _url(event.value), event.attempts, None
        return row

    def _on_rejected(self, event: PromiseRejectedEvent, now: float) -> Row:
        row = self.rows[event.id]
        self._settle(row, "rejected", now)
        row.error, row.attempt = event.error.message, event.attempts
        return row

    def _settle(self, row: Row, state: str, now: float) -> None:
        self._move(row, state)
        if not self.settled_log or now - self.settled_log[-1][0] >= RATE_SAMPLE:
            self.settled_log.append((now, self.settled))

    def rate(self, now: float) -> float:
        """Branches settled per second over the last few seconds."""
        log = self.settled_log
        if not log:
            return 0.0
        # the oldest sample of the last five seconds, against the count right now
        t0, n0 = next((s for s in log[-200:] if now - s[0] <= 5.0), log[-1])
        done = self.settled
        return (done - n0) / (now - t0) if now > t0 and done > n0 else 0.0


_HANDLERS: dict[type, Callable[[Board, Any, float], Row]] = {
    PromiseQueued: Board._on_queued,
    PromiseReplayed: Board._on_replayed,
    AttemptStarted: Board._on_started,
    AttemptFailed: Board._on_failed,
    PromiseResolved: Board._on_resolved,
    PromiseRejectedEvent: Board._on_rejected,
}


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


def _url(value: object) -> str | None:
    return image_location(value) if isinstance(value, dict) else None


def _detail(row: Row, now: float) -> Text:
    if row.state == "retrying" and row.retry_at is not None:
        left = max(0.0, row.retry_at - now)
        text = Text(f"retry in {left:.1f} s — {escape_control(row.error or '')}", style="yellow")
    elif row.state in ("resolved", "replayed") and row.url:
        text = Text(escape_control(row.url))
    elif row.state == "rejected":
        text = Text(escape_control(row.error or "rejected"), style="red")
    else:
        text = Text("")
    text.overflow = "ellipsis"
    text.no_wrap = True
    return text


def _row_cells(row: Row, now: float, live: bool) -> list[RenderableType]:
    cells: list[RenderableType] = [
        Text(escape_control(row.label)),
        Text(escape_control(row.id), style="dim"),
        Text(row.state, style=STATE_STYLE[row.state]),
        str(row.attempt) if row.attempt else "",
    ]
    if live:
        cells.append(f"{now - row.since:.1f} s" if row.state == "running" else "")
    cells.append(_detail(row, now))
    return cells


def _table(rows: list[Row], now: float, live: bool) -> Table:
    """One line per branch; the result column is cut with … rather than wrapped."""
    table = Table(expand=False, box=None, pad_edge=False, header_style="bold")
    # Fixed columns keep their width; only the result column gives way in a narrow terminal.
    widths = {
        "style": max((len(escape_control(r.label)) for r in rows), default=5),
        "id": max((len(escape_control(r.id)) for r in rows), default=2),
        "state": 8,
        "attempt": 7,
        "elapsed": 7,
    }
    for name in ["style", "id", "state", "attempt", *(["elapsed"] if live else [])]:
        table.add_column(name, no_wrap=True, min_width=widths[name])
    table.add_column("result", overflow="ellipsis")  # wrapable, so the table may shrink it
    for row in rows:
        table.add_row(*_row_cells(row, now, live))
    return table


def _footer(board: Board, now: float, live: bool) -> Text:
    counts = board.counts
    text = " · ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
    if live:
        end = board.finished or now
        text += f"  —  wall {end - board.started:.1f} s"
    return Text(text, style="dim")


def board_renderable(
    board: Board, now: float | None = None, *, live: bool = True
) -> RenderableType:
    """The whole live view: header, table (or summary past the limit), footer."""
    now = time.monotonic() if now is None else now
    parts: list[RenderableType] = []
    info = board.info
    if info is not None:
        mode = "watch" if info.following else "resume" if info.resumed else "run"
        mode = "crash mode" if mode == "run" and info.spec.crash else mode
        parts.append(
            Text.from_markup(
                f"[bold]{escape(escape_control(info.id))}[/]  "
                f"{escape(quoted(_short(info.spec.prompt, 60)))}  "
                f"[dim]{mode} · {len(board.rows)} branches · max {info.max_attempts} attempts[/]"
            )
        )
    if board.batches:
        parts.append(_batch_lines(board.batches))
    total = len(board.rows)
    if total <= FULL_TABLE_LIMIT:
        parts.append(_table(list(board.rows.values()), now, live))
    else:
        parts.append(_summary(board, now))
    parts.append(_footer(board, now, live))
    return Group(*parts)


def _summary(board: Board, now: float) -> RenderableType:
    total = len(board.rows)
    done = board.settled
    rate = board.rate(now)
    eta = f"ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=total, completed=done, width=40),
        f"{done}/{total}",
        f"{rate:.0f}/s" if rate else "",
        eta,
    )
    by_state = board.by_state
    # A few failures, then what is happening now, the longest-waiting first.
    shown = list(itertools.islice(by_state["rejected"].values(), REJECTED_ROWS_SHOWN))
    current = [*by_state["retrying"].values(), *by_state["running"].values()]
    room = ACTIVE_ROWS_SHOWN - len(shown)
    shown += heapq.nsmallest(room, current, key=lambda r: (r.state != "retrying", r.since))
    parts: list[RenderableType] = [bar]
    if board.groups:
        parts.append(_prompt_rows(board))
    if shown:
        parts.append(_lines(shown, now))
    hidden = sum(len(by_state[s]) for s in ("rejected", "retrying", "running")) - len(shown)
    if hidden > 0:
        parts.append(Text(f"… and {hidden} more running, retrying or rejected", style="dim"))
    return Group(*parts)


PROMPT_ROWS_SHOWN = 8
ACTIVE = ("running", "retrying", "rejected")


def _prompt_rows(board: Board) -> RenderableType:
    """A run over a prompt file, one row a prompt: the prompts with branches running,
    retrying or rejected first (at most a few), each with its counts."""
    prompts = board.info.spec.prompts if board.info is not None else ()
    active = [i for i, c in board.groups.items() if any(c[s] for s in ACTIVE)]
    chosen = sorted(active)[:PROMPT_ROWS_SHOWN]
    table = Table(box=None, pad_edge=False, show_edge=False, show_header=False)
    for _ in range(3):
        table.add_column()
    for index in chosen:
        counts = board.groups[index]
        prompt = str(prompts[index]["prompt"]) if index < len(prompts) else "?"
        done = sum(counts[s] for s in ("resolved", "replayed", "rejected"))
        states = " · ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
        table.add_row(
            f"#{index + 1}",
            Text(_short(escape_control(prompt), 50)),
            Text(f"{done}/{sum(counts.values())}  {states}", style="dim"),
        )
    settled = ("resolved", "replayed", "rejected")
    finished = sum(
        1 for c in board.groups.values() if sum(c[s] for s in settled) == sum(c.values())
    )
    rest = len(board.groups) - len(chosen)
    note = Text(f"{len(board.groups)} prompts, {finished} finished", style="dim")
    if rest > 0:
        note.append(f"; {rest} not shown")
    return Group(table, note) if chosen else note


def _lines(rows: list[Row], now: float) -> Text:
    """The active rows of a large run as aligned lines, with the table's columns but no
    header. Drawn ~5 times a second beside thousands of branches: a rich Table took
    ~6 ms more per frame (measured), time taken from the run."""
    labels = [escape_control(r.label) for r in rows]
    ids = [escape_control(r.id) for r in rows]
    label_width = max(map(len, labels))
    id_width = max(map(len, ids))
    lines = []
    for row, label, row_id in zip(rows, labels, ids, strict=True):
        elapsed = f"{now - row.since:.1f} s" if row.state == "running" else ""
        line = Text.assemble(
            f"{label:<{label_width}}  ",
            (f"{row_id:<{id_width}}  ", "dim"),
            (f"{row.state:<8}", STATE_STYLE[row.state]),
            f"  {row.attempt or '':>2}  {elapsed:>6}  ",
            _detail(row, now),
        )
        lines.append(line)
    return Text("\n", no_wrap=True, overflow="ellipsis").join(lines)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def batch_line(group: GroupProgress, now: float | None = None) -> str:
    """One line for a run's provider batch: its status, counts and age of its 24 hours."""
    counts = group.counts
    line = (
        f"Batch {group.batch_id or '(not created)'} ({group.requests:,} requests): {group.status}"
    )
    if group.sent:
        line += f", {counts['completed']:,} done, {counts['failed']:,} failed"
    age = group.age(now)
    if age is not None and not group.collected:
        line += f", {_hours(age)} of its 24 h"
    if group.collected:
        done = group.collected
        line += (
            f"; collected: {done.get('resolved', 0)} images, {done.get('rejected', 0)} "
            f"rejected, {done.get('unfinished', 0)} not run"
        )
    return line


BATCH_LINES_SHOWN = 8


def _batch_lines(batches: RunBatches) -> Text:
    """A line per batch of the run (the open ones first, at most a few), redrawn with the
    table as they are polled."""
    groups = sorted(batches, key=lambda g: not g.open)
    lines = [Text(escape_control(batch_line(g)), style="cyan") for g in groups[:BATCH_LINES_SHOWN]]
    if len(groups) > BATCH_LINES_SHOWN:
        rest = len(groups) - BATCH_LINES_SHOWN
        lines.append(Text(f"… and {rest} more: {batches_summary(batches)}", style="dim"))
    return Text("\n", no_wrap=True, overflow="ellipsis").join(lines)


def batches_summary(batches: RunBatches) -> str:
    """A run's batches in a few words: ``2 batches: in_progress 40/120`` (requests done of
    all), or ``3 batches: 1 completed, 2 in_progress 70/180`` when their statuses differ."""
    groups = batches.groups
    statuses = Counter(g.status for g in groups)
    done = sum(g.counts["completed"] for g in groups)
    total = sum(g.requests for g in groups)
    if len(statuses) == 1:
        said = next(iter(statuses))
    else:
        said = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    many = "batch" if len(groups) == 1 else "batches"
    return escape_control(f"{len(groups)} {many}: {said} {done:,}/{total:,}")


def _hours(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class BatchLines:
    """The lines of a run's batches that changed since they were last told."""

    def __init__(self) -> None:
        self._told: dict[int, str] = {}

    def changed(self, batches: RunBatches) -> list[str]:
        lines = []
        for group in batches:
            key = f"{group.status}{group.counts}{group.collected}"
            if self._told.get(group.group) != key:
                self._told[group.group] = key
                lines.append(batch_line(group))
        return lines


class PlainReporter:
    """One line per event, no escape codes: ``[cartoon]   Done: https://...``."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.labels: dict[str, str] = {}
        self.width = 0
        self._batches = BatchLines()

    def on_batches(self, batches: RunBatches) -> None:
        for line in self._batches.changed(batches):
            self._say(line)

    def run_started(self, info: RunInfo) -> None:
        what = "Following" if info.following else "Resuming" if info.resumed else "Started"
        self._say(f"{what} run {info.id}: {quoted(info.spec.prompt)}")
        self._say(f"If interrupted, resume with: imagepipe resume {info.id}")

    def _say(self, line: str) -> None:
        line = escape_control(line)  # ids, prompts, URLs and errors come from the store
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _tagged(self, promise_id: str, message: str) -> None:
        label = f"[{self.labels[promise_id]}]"
        self._say(f"{label:<{self.width + 3}} {message}")

    def on_event(self, event: Event) -> None:
        if isinstance(event, RunDraining):
            self._say(draining_line(event))
            return
        if isinstance(event, PromiseQueued | PromiseReplayed):
            self.labels[event.id] = BranchArgs.read(event.args).label
            self.width = max(self.width, len(self.labels[event.id]))
        if isinstance(event, PromiseReplayed):
            if event.state == "resolved":
                self._tagged(event.id, f"Replayed from the store: {_url(event.value)}")
            else:
                error = event.error.message if event.error else "rejected"
                self._tagged(event.id, f"Replayed from the store: rejected: {error}")
        elif isinstance(event, AttemptStarted):
            self._tagged(event.id, f"Generating image (attempt {event.attempt})...")
        elif isinstance(event, AttemptFailed):
            if event.retry_in is not None:
                self._tagged(event.id, failure_line(event.func, event.error, event.retry_in))
            else:
                self._tagged(event.id, f"Attempt {event.attempt} failed: {event.error.message}")
        elif isinstance(event, PromiseResolved):
            self._tagged(event.id, f"Done: {_url(event.value)}")
        elif isinstance(event, PromiseRejectedEvent):
            self._tagged(event.id, f"Rejected after {_attempts(event.attempts)}")


class LiveReporter:
    """A ``rich.live`` table redrawn a few times a second from the :class:`Board`."""

    def __init__(self, console: Console, refresh_per_second: float = 5) -> None:
        self.console = console
        self.board = Board()
        self.live = Live(
            console=console,
            refresh_per_second=refresh_per_second,
            get_renderable=lambda: board_renderable(self.board),
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def on_batches(self, batches: RunBatches) -> None:  # drawn with the table, updated
        self.board.batches = batches

    def __enter__(self) -> LiveReporter:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.board.finished = time.monotonic()
        self.live.stop()  # draws the final frame

    def run_started(self, info: RunInfo) -> None:
        self.board.info = info
        self.board.started = time.monotonic()

    def on_event(self, event: Event) -> None:
        if isinstance(event, RunDraining):  # the run's, not a branch's: above the table
            self.console.print(Text(escape_control(draining_line(event)), style="yellow"))
            return
        self.board.apply(event)
        if isinstance(event, AttemptFailed) and event.retry_in is not None:
            line = failure_line(event.func, event.error, event.retry_in)
            self.console.print(Text(escape_control(line), style="yellow"))
