"""webdataset shards read with the standard library: brace expansion, streaming and indexing.

A shard is a tar file; the members of one sample are adjacent and share a key (the
member path up to the first dot of its file name): ``000123.jpg``, ``000123.txt``,
``000123.json``. The image is the first member with an image extension; the caption
comes from ``.txt`` (or ``.caption``/``.text``), else from the ``caption``/``captions``
field of ``.json``, which may also carry ``qa``.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlzoo.data.images import BadSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
TEXT_EXTENSIONS = ("txt", "caption", "text")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``dir/{00000..00003}.tar`` -> four paths (zero padding kept); ``{a,b}`` lists too."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for item in items for path in expand_braces(head + item + tail)]


def is_shard_spec(spec: str) -> bool:
    """Whether a data source string names webdataset shards (tar files or a folder of them)."""
    if spec.endswith(".tar") or ".tar}" in spec or (spec.endswith("}") and ".tar" in spec):
        return True
    path = Path(spec)  # a folder of shards may hold img2dataset's parquet/stats files too, not a datasets folder
    saved_dataset = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    return path.is_dir() and any(path.glob("*.tar")) and not saved_dataset


def shard_paths(spec: str) -> list[str]:
    """The shard files of ``spec`` (brace pattern, glob, single tar or folder), sorted."""
    path = Path(spec)
    if path.is_dir():
        paths = sorted(str(p) for p in path.glob("*.tar"))
    else:
        paths = [p for item in expand_braces(spec) for p in (sorted(glob.glob(item)) if "*" in item else [item])]
    if not paths:
        raise ValueError(f"{spec}: no webdataset shards found")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{spec}: {len(missing)} of {len(paths)} shards do not exist (first: {missing[0]})")
    return paths


def sample_key(name: str) -> tuple[str, str]:
    """Member path -> (sample key, extension): ``a/b/0001.seg.jpg`` -> (``a/b/0001``, ``seg.jpg``)."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


@dataclass(frozen=True)
class TarMember:
    """Where a member's bytes lie in a shard, for random access without tarfile."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def file_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """``(sample key, extension, member)`` for each regular file of an open shard."""
    for info in tar:
        if info.isfile():
            yield (*sample_key(info.name), info)


def iter_samples(shard: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(location, {extension: bytes})`` for each sample of a shard. A shard that
    is corrupt part-way yields what came before, then ``(location, BadSample)``."""
    current, members = None, {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for key, extension, info in file_members(tar):
                if key != current and members:
                    yield f"{shard}:{current}", members
                    members = {}
                current = key
                handle = tar.extractfile(info)
                members[extension] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        if members:
            yield f"{shard}:{current}", members
        yield f"{shard}:after {current}", BadSample(f"corrupt shard, rest skipped ({err})")
        return
    if members:
        yield f"{shard}:{current}", members


def index_shard(shard: str) -> tuple[list[tuple[str, dict[str, TarMember | bytes]]], list[tuple[str, str]]]:
    """Random-access index of a shard: per sample, image members as :class:`TarMember`
    and text members read. Returns (samples, skipped) where skipped is a corrupt tail."""
    samples: dict[str, dict[str, TarMember | bytes]] = {}
    skipped: list[tuple[str, str]] = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for key, extension, info in file_members(tar):
                entry = samples.setdefault(key, {})
                if extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                    entry[extension] = TarMember(shard, info.offset_data, info.size)
                else:
                    handle = tar.extractfile(info)
                    entry[extension] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        skipped.append((f"{shard}:after {next(reversed(samples), 'start')}", f"corrupt shard, rest skipped ({err})"))
    return [(f"{shard}:{key}", members) for key, members in samples.items()], skipped


def split_members(members: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """A sample's members -> (image member, caption value, extras with ``qa``).

    Raises :class:`BadSample` when there is no image or no caption, or the JSON is bad.
    """
    image = next((members[e] for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image is None:
        raise BadSample(f"no image member (has {', '.join(sorted(members)) or 'nothing'})")
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadSample(f"bad .json member ({err})") from err
        if not isinstance(meta, dict):
            meta = {}
    caption = next((members[e] for e in TEXT_EXTENSIONS if e in members), None)
    if caption is None:
        caption = meta.get("captions", meta.get("caption"))
    if caption is None:
        raise BadSample("no caption (.txt member or 'caption' in .json)")
    extras = {"qa": meta["qa"]} if isinstance(meta.get("qa"), list) else {}
    return image, caption, extras
