"""Progress of long work, readable wherever the output goes: a live bar (tqdm) on a terminal,
plain lines at intervals when stderr is a file or a pipe (a log, CI), where a bar's carriage
returns would pile up into thousands of lines.
"""
from __future__ import annotations

import sys
import time

# A plain line at most this often (seconds) when stderr is not a terminal.
LINE_INTERVAL = 30.0


class Lines:
    """The part of tqdm's interface rocket uses, printing one line per LINE_INTERVAL and at the end."""

    def __init__(self, iterable=None, *, total=None, initial=0, desc="", unit="it", disable=False,
                 interval=LINE_INTERVAL, file=None, **_ignored):
        self.iterable, self.total, self.n = iterable, total, initial
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.desc, self.unit, self.disable, self.interval = desc, unit, disable, interval
        self.file = file or sys.stderr
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self) -> None:
        seconds = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{pct} in {seconds:.0f}s{post}", file=self.file, flush=True)

    def update(self, n=1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and not self.disable:
            self._line()
        self.closed = True


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on a terminal, else Lines; same arguments (total, initial, desc, unit, disable)."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(iterable, **kwargs)
    return Lines(iterable, **kwargs)
