"""Progress of long loops (calibration batches, router fitting, probe sweeps): a bar on a terminal, plain lines in a log.

`progress_bar` is the one way sparsec shows progress. On a terminal (stderr is a TTY) it is a tqdm bar. Written to
a file or a pipe, tqdm's carriage-return redraws would pile up into one long line, so there is no bar: a loop that
runs longer than `LOG_EVERY_S` logs a plain `desc: n/total` line that often and one when it ends; short loops say
nothing (the compiler logs a line per phase and pass anyway).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

LOG_EVERY_S = 30.0


class PlainProgress:
    """tqdm's `update` / `close` / iteration, written as occasional whole lines to `stream` (see module doc)."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, enabled: bool, stream: TextIO) -> None:
        self.iterable, self.desc, self.enabled, self.stream = iterable, desc, enabled, stream
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = 0
        self.start = self.last = time.monotonic()
        self.logged = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= LOG_EVERY_S:
            self.last, self.logged = now, True
            self._line("")

    def close(self) -> None:
        if self.enabled and self.logged:
            self.logged = False
            self._line(f" done in {time.monotonic() - self.start:.0f}s")

    def _line(self, tail: str) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        print(f"[sparsec]     {self.desc}: {self.n}{of}{tail}", file=self.stream, flush=True)


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    stream: TextIO | None = None,
) -> Any:
    """A progress display over `iterable` (or driven by `update(n)` and `close()`), to `stream` (stderr): a tqdm
    bar on a TTY, occasional plain lines otherwise; nothing when not `enabled`.

    Example::

        for batch in progress_bar(batches, desc="quality check", enabled=ctx.progress):
            ...
    """
    stream = stream or sys.stderr
    if enabled and stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, file=stream)
    return PlainProgress(iterable, total, desc, enabled, stream)
