"""Small helpers shared across the package."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def vlzoo_home() -> Path:
    """Root of vlzoo's cache: ``$VLZOO_HOME`` or, when unset or empty, ``~/.cache/vlzoo``
    (an empty value must not put the cache in the working folder)."""
    return Path(os.environ.get("VLZOO_HOME") or Path.home() / ".cache" / "vlzoo")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_file(path: str | os.PathLike, expected: str = "a JSON object") -> Any:
    """The JSON in ``path``; a file that is not valid UTF-8 JSON, or whose top level is not
    a dict when ``expected`` says "object", raises a ValueError naming the file, where it
    breaks and what was expected."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                         f"expected {expected}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason}); expected {expected}") from err
    if "object" in expected and not isinstance(value, dict):
        raise ValueError(f"{path}: expected {expected}, got a JSON {type(value).__name__}")
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock between processes (e.g. DDP ranks fetching or training the same
    artefact), held on ``path`` until the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03``; ``?`` for an unknown (infinite) duration."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLines:
    """Plain progress lines on stderr for work outside a Trainer (generating data):
    ``vlzoo: LABEL 5000/20000 (25%) | 140 UNIT/s | elapsed 0:36, ETA 1:47`` at most every
    ``every_seconds``, and a last line when done."""

    def __init__(self, label: str, total: int, unit: str = "items", every_seconds: float = 10.0) -> None:
        self.label, self.total, self.unit, self.every_seconds = label, total, unit, every_seconds
        self.done = 0
        self.start = self._last = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.every_seconds:
            self._last = now
            self.print()

    def print(self) -> None:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100 * self.done / self.total if self.total else 100.0
        print(f"vlzoo: {self.label} {self.done}/{self.total} ({percent:.0f}%) | {rate:.0f} {self.unit}/s | "
              f"elapsed {duration(elapsed)}, ETA {duration(eta)}", file=sys.stderr, flush=True)
