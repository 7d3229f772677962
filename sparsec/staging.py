"""Output directories that appear whole or not at all.

A command that writes a directory (`sparsec compile --out`, `sparsec analyze --out`) first checks that it can
(`check_creatable`, before any heavy work), writes into a staging directory beside it (`stage_beside`) and moves
that into place when everything passed (`move_into_place`). `signals_as_exceptions` turns SIGTERM and SIGHUP into
`Terminated`, raised where the program is, so the `finally` that removes the staging directory runs on a signal as
it does on an error or Ctrl-C (SIGKILL alone cannot be caught).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsec.errors import SparsecError, Terminated

CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def check_creatable(path: str | os.PathLike, option: str) -> None:
    """`SparsecError` (exit 2) naming `option` unless the directory `path` exists or can be created, and a staging
    directory can be made beside it: its nearest existing ancestor must be a directory this process can write to
    (`--out afile/out` under a file, `--out /proc/x`, a read-only mount are refused). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SparsecError(f"{option} {path} exists and is not a directory; choose a directory")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SparsecError(f"{option} {path}: {ancestor} is a file, not a directory; choose a path under a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sparsec-check-", dir=ancestor))
    except OSError as exc:
        raise SparsecError(
            f"{option} {path}: cannot create a directory in {ancestor} ({exc.strerror or exc}); choose a writable "
            "location"
        ) from exc


def stage_beside(out_dir: Path) -> Path:
    """A new, empty staging directory beside `out_dir` (its parent created), hidden: `.NAME.tmp-XXXX`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def make_readable(stage: Path) -> None:
    """Give the staged directories and files the modes the umask allows (0o777 / 0o666 & ~umask), as a plain
    `mkdir` and `open` would: `tempfile.mkdtemp` made the stage 0o700, which no service account could read."""
    umask = os.umask(0)
    os.umask(umask)
    for directory, _, files in os.walk(stage):
        os.chmod(directory, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(directory) / name, 0o666 & ~umask)


def move_into_place(stage: Path, out_dir: Path) -> None:
    """Replace `out_dir` (if any) with `stage`. The signals are held back between the two renames, so a signal
    leaves either the earlier output or the new one in place, never neither; the earlier one is removed even when a
    signal held back meanwhile is raised as they end."""
    old, moved = None, False
    try:
        with _signals_held():
            if out_dir.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                os.rmdir(aside)
                os.replace(out_dir, aside)
                old = aside
            os.replace(stage, out_dir)
            moved = True
    finally:
        if old is not None and moved:
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            os.replace(old, out_dir)  # the new output could not be moved in: the earlier one goes back


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise `Terminated` in the main thread (see the module docstring). Only
    signals whose handler is the default are taken over, and given back on leaving, so an application's own
    handlers stay; nested uses and other threads change nothing. A second signal while the first unwinds is
    ignored, so the cleanup it triggered finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    taken = [s for s in CAUGHT_SIGNALS if signal.getsignal(s) is signal.SIG_DFL]
    for s in taken:
        signal.signal(s, _raise_terminated)
    try:
        yield
    finally:
        for s in taken:
            signal.signal(s, signal.SIG_DFL)


def _raise_terminated(signum: int, frame) -> None:
    for s in CAUGHT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def _signals_held() -> Iterator[None]:
    """`CAUGHT_SIGNALS` and SIGINT that arrive inside the block are recorded and acted on when it ends: the first
    is then handed to the handler it would have reached (a Python handler is called and raises there; a default
    action is taken by raising the signal again). Python runs signal handlers in the main thread whichever thread
    the kernel chose (torch's worker threads block nothing), so deferring in the handler holds where a signal mask
    would not. Outside the main thread, where handlers cannot be set, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, _frame) -> None:
        pending.append(signum)

    previous = {s: signal.signal(s, record) for s in (*CAUGHT_SIGNALS, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])
