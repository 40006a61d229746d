"""Small helpers shared across the package."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
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
