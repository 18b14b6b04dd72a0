"""Progress for long steps: one bar per step (tqdm, on stderr), human-rounded numbers, detail lines for -v.

What passes and the pipeline use (passes reach it through `PassContext.progress`, a `Progress`):

    bar = ctx.progress.track(groups, desc="prune: sensitivity", unit="group")
    for g in bar:
        ...
        bar.note(loss=0.2980151782370515)        # shown on the bar as "loss=0.298"
    with ctx.progress.step("quant: calibrating 120 activation tensors"):
        ...
    bar = ctx.progress.bar(total, "quant: sensitivity", unit="trial")   # a helper's progress(msg) callback
    helper(..., progress=bar.tick); bar.close()
    ctx.progress.detail("group 20: ...")        # the full-precision detail; shown only with -v (DEBUG)
    ctx.progress("prune: 18/27 prunable groups") # one plain INFO line

Bars are drawn only after `configure(bars=True)`, which the CLI does unless -q. Library use and tests therefore
stay silent: there a tracked loop logs one INFO summary line when it ends. On a terminal a bar redraws in place;
when stderr is a file or a pipe (CI, `make > log`), it prints one line at most every LOG_INTERVAL_S seconds and a
final line, so logs stay readable. `LogHandler` writes log records around an active bar instead of through it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("edgec.progress")
LOG_INTERVAL_S = 10.0
_BARS = False
_T0 = time.perf_counter()


def configure(*, bars: bool) -> None:
    """Turn bars on (the CLI, unless -q) or off (the default: libraries and tests); restarts the clock that prefixes
    bar lines off a terminal (the CLI's log lines use the same `[  12.3s]` prefix)."""
    global _BARS, _T0
    _BARS = bool(bars)
    _T0 = time.perf_counter()


def bars_enabled() -> bool:
    return _BARS


def human(x: Any) -> str:
    """A number as a person reads it: 3 significant digits, no 16-digit floats; other values unchanged."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            import numpy as np

            if isinstance(x, np.generic):
                return human(x.item())
        except ImportError:  # pragma: no cover
            pass
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.3g}"
    return f"{x:.2e}"


def seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{int(s // 60)} min {int(s % 60):02d} s"


class _Lines:
    """A tqdm file for non-terminals: each redraw becomes one line; blank clear-line writes and a redraw at the same
    count as the line before (the final redraw on close) are dropped."""

    def __init__(self, stream):
        self.stream = stream
        self._last = ""

    def write(self, s: str) -> None:
        s = s.replace("\r", "").rstrip()
        key = s.split("[", 1)[0]  # description, percentage, bar and n/total; the timing part follows '['
        if s and key != self._last:
            self._last = key
            self.stream.write(f"[{time.perf_counter() - _T0:7.1f}s] {s}\n")

    def flush(self) -> None:
        self.stream.flush()


class Tracker:
    """One long step: iterate it (or call advance()); note() shows rounded values on the bar."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, detail_every: int = 1):
        self._it = iterable
        self.detail_every = max(1, int(detail_every))
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self._t0 = time.perf_counter()
        self._bar = None
        self._closed = False
        if _BARS:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr if tty else _Lines(sys.stderr),
                             leave=True, dynamic_ncols=tty, ncols=None if tty else 100, delay=1.0,
                             mininterval=0.5 if tty else LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 3)

    def __iter__(self) -> Iterator:
        if self._it is None:
            raise TypeError("this tracker has no iterable; call advance()")
        try:
            for x in self._it:
                yield x
                self.advance()
        finally:
            self.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def tick(self, msg: str | None = None) -> None:
        """advance(1), and log `msg` as -v detail every `detail_every` ticks (a `progress(msg)` callback)."""
        self.advance()
        if msg and self.n % self.detail_every == 0:
            log.debug("%s", msg)

    def note(self, **values: Any) -> None:
        """Show values next to the bar, rounded (exact values belong in a `detail` line, for -v)."""
        if self._bar is not None:
            self._bar.set_postfix_str(" ".join(f"{k}={human(v)}" for k, v in values.items()), refresh=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            of = f"/{self.total}" if self.total is not None else ""
            log.info("%s: %d%s %s in %s", self.desc, self.n, of, self.unit, seconds(time.perf_counter() - self._t0))


def track(iterable: Iterable, total: int | None = None, desc: str = "", unit: str = "it") -> Tracker:
    """Iterate `iterable` under a progress bar (with an ETA when the total is known)."""
    return Tracker(iterable, total, desc, unit)


@contextlib.contextmanager
def step(desc: str, total: int | None = None, unit: str = "it") -> Iterator[Tracker]:
    """A long step that is not a plain loop: logs `desc`, yields a Tracker (advance()/note()), logs its time (-v)."""
    log.info("%s", desc)
    t0 = time.perf_counter()
    if total is None:
        tr = Tracker(None, None, desc, unit)
        tr._closed = True  # no bar and no summary for an open-ended step: the start line says what runs
        yield tr
    else:
        with Tracker(None, total, desc, unit) as tr:
            yield tr
    log.debug("%s: %s", desc, seconds(time.perf_counter() - t0))


class Progress:
    """The progress API a pass sees as `ctx.progress`. Calling it logs one INFO line (the old interface)."""

    def __init__(self, info: Callable[[str], None] | None = None):
        self._info = info

    def __call__(self, msg: str) -> None:
        if self._info is not None:
            self._info(msg)
        else:
            log.info("%s", msg)

    def track(self, iterable: Iterable, total: int | None = None, desc: str = "", unit: str = "it") -> Tracker:
        return track(iterable, total, desc, unit)

    def step(self, desc: str, total: int | None = None, unit: str = "it"):
        return step(desc, total, unit)

    def bar(self, total: int | None, desc: str, unit: str = "it", detail_every: int = 1) -> Tracker:
        """A bar driven by hand (advance()/tick(msg), then close()): for loops that run inside a helper that
        takes a `progress(msg)` callback; pass `bar.tick`."""
        return Tracker(None, total, desc, unit, detail_every)

    def detail(self, msg: str, *args: Any) -> None:
        """Full-precision detail for -v (logging DEBUG)."""
        log.debug(msg, *args)


def as_progress(p: Progress | Callable[[str], None] | None) -> Progress:
    """Wrap a plain `progress(msg)` callable (the old PassContext field) as a Progress."""
    return p if isinstance(p, Progress) else Progress(p)


class LogHandler(logging.StreamHandler):
    """A stderr handler that prints above an active tqdm bar instead of through it. It writes to whatever
    `sys.stderr` is when a record is emitted (not the stream it was created with), so a replaced or closed stderr
    (a test's capture, a redirect) never receives a stale write."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if _BARS:
                from tqdm import tqdm

                tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + self.terminator)
                self.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
