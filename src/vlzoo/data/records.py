"""Annotation files -> records: JSONL, CSV/TSV (open_clip's convention), JSON (Karpathy
splits of COCO/Flickr30k, or a list of records as LAVIS writes them).

A record is a dict ``{"image": reference, "captions": list[str], "location": str}``
with optional ``qa`` (list of ``{"question", "answer", "type"}``) and ``negatives``
(list of captions). Records of the same image are merged, so an image is one item
with all its captions. A row that cannot be used is not an error: it is returned in
the ``skipped`` list as ``(location, reason)``; the caller applies the bad-sample policy.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlzoo.data.images import BadSample
from vlzoo.utils import read_json_file

IMAGE_COLUMNS = ("image", "filepath", "image_path", "img", "jpg", "png", "file_name", "path", "url")
CAPTION_COLUMNS = ("captions", "caption", "title", "text", "txt", "sentences", "sentence")
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclass
class RecordList:
    """Records of one split, and the rows skipped while reading them."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def clean_captions(value: Any) -> list[str]:
    """A caption field -> non-empty, whitespace-normalised strings.

    Accepts a string, bytes (UTF-8), a list of them, or Karpathy ``{"raw": ...}``
    sentences. Raises :class:`BadSample` when nothing usable remains.
    """
    if value is None:
        raise BadSample("no caption")
    items = value if isinstance(value, (list, tuple)) else [value]
    captions = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("raw", item.get("caption"))
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadSample("caption is not valid UTF-8") from err
        if not isinstance(item, str):
            raise BadSample(f"caption must be a string or a list of strings, got {type(item).__name__}")
        try:
            item.encode("utf-8")  # lone surrogates: bytes that were not UTF-8 (read with surrogateescape)
        except UnicodeEncodeError as err:
            raise BadSample("caption is not valid UTF-8") from err
        text = " ".join(item.split())
        if text:
            captions.append(text)
    if not captions:
        raise BadSample("empty caption")
    return captions


def optional_lists(row: dict[str, Any]) -> dict[str, Any]:
    """The well-formed ``qa`` pairs (type ``all`` unless given), ``negatives`` and class
    ``label`` (a string or number, kept as a string) of a row."""
    extras = {}
    label = row.get("label")
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, (str, int)) and not isinstance(label, bool) and str(label).strip():
        extras["label"] = str(label).strip()
    if isinstance(row.get("qa"), list):
        extras["qa"] = [{"type": "all", **q} for q in row["qa"] if isinstance(q, dict) and "question" in q
                        and "answer" in q]
    if isinstance(row.get("negatives"), list):
        extras["negatives"] = [n["caption"] if isinstance(n, dict) else n for n in row["negatives"]
                               if isinstance(n, (str, dict))]
    return extras


def _image_path(value: Any, root: Path, allow_outside: bool = False) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise BadSample("no image path")
    return confined_path(value, root, allow_outside)


def confined_path(value: str, root: Path, allow_outside: bool = False) -> Path:
    """``value`` as a path: an absolute path as it is, a relative one under ``root``. A
    relative path that leaves ``root`` (``../outside/x.png``) is a bad sample unless
    ``allow_outside`` (``data.allow_outside_root``)."""
    path = Path(value)
    if path.is_absolute():
        return path
    joined = root / path
    inside = os.path.normpath(joined)
    base = os.path.normpath(root)
    if not allow_outside and os.path.commonpath([base, inside]) != base:
        raise BadSample(f"image path {value!r} leaves the data folder {root} (relative paths stay under the "
                        "annotation file's folder or data.image_root; set data.allow_outside_root: true to allow)")
    return joined


def merge_by_image(rows: RecordList) -> RecordList:
    """Merge records that name the same image: captions, QA and negatives concatenated."""
    merged: dict[Any, dict[str, Any]] = {}
    for record in rows.records:
        key = record["image"]
        if key not in merged:
            merged[key] = {**record, "captions": list(record["captions"])}
            continue
        target = merged[key]
        target["captions"] += [c for c in record["captions"] if c not in target["captions"]]
        for name in ("qa", "negatives"):
            if name in record:
                target[name] = target.get(name, []) + record[name]
    return RecordList(list(merged.values()), rows.skipped)


def read_jsonl(path: str | Path, image_root: str | Path | None = None, image_column: str | None = None,
               caption_column: str | None = None, allow_outside_root: bool = False) -> RecordList:
    """One JSON object a line: ``image`` (path relative to the file or ``image_root``),
    ``caption`` or ``captions``, optional ``qa`` and ``negatives``; other field names
    through ``image_column``/``caption_column``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out = RecordList()
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # -sig: a BOM is not data
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            location = f"{path}:{number}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BadSample(f"not valid JSON ({err.msg})") from err
                out.records.append(_row_record(row, root, location, image_column, caption_column,
                                               allow_outside_root))
            except BadSample as bad:
                out.skipped.append((location, bad.reason))
    return merge_by_image(out)


def _row_record(row: Any, root: Path, location: str, image_key: str | None, caption_key: str | None,
                allow_outside: bool = False) -> dict:
    if not isinstance(row, dict):
        raise BadSample("expected a JSON object")
    image_key = image_key or _first_present(row, IMAGE_COLUMNS, "image")
    caption_key = caption_key or _first_present(row, CAPTION_COLUMNS, "caption")
    captions = clean_captions(row.get(caption_key))
    return {**optional_lists(row), "image": _image_path(row.get(image_key), root, allow_outside), "captions": captions,
            "location": location}


def _first_present(row: dict, names: tuple[str, ...], what: str) -> str:
    for name in names:
        if name in row:
            return name
    raise BadSample(f"no {what} field (looked for {', '.join(names)})")


def read_csv(path: str | Path, image_column: str | None = None, caption_column: str | None = None,
             separator: str | None = None, image_root: str | Path | None = None,
             allow_outside_root: bool = False) -> RecordList:
    """open_clip's CSV/TSV convention: a header row, image paths in ``image_column``
    (default ``filepath``), captions in ``caption_column`` (default ``title``);
    separator tab for ``.tsv``, comma for ``.csv`` unless given."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    separator = separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
    image_column, caption_column = image_column or "filepath", caption_column or "title"
    out = RecordList()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=separator)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r}; the header has {reader.fieldnames} "
                             f"(set data.image_column / data.caption_column, data.csv_separator)")
        for row in reader:
            location = f"{path}:{reader.line_num}"
            try:
                out.records.append({"image": _image_path(row[image_column], root, allow_outside_root),
                                    "captions": clean_captions(row[caption_column]), "location": location})
            except BadSample as bad:
                out.skipped.append((location, bad.reason))
    return merge_by_image(out)


def read_json(path: str | Path, split: str, image_root: str | Path | None = None,
              image_column: str | None = None, caption_column: str | None = None,
              allow_outside_root: bool = False) -> RecordList:
    """A Karpathy split file (``{"images": [{"filepath", "filename", "split",
    "sentences"}]}``; images of ``split``, ``train`` including ``restval``) or a JSON
    list of records (one per caption or per image)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    data = read_json_file(path, "a Karpathy split file or a list of records")
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return merge_by_image(_karpathy(data["images"], path, root, split, allow_outside_root))
    if isinstance(data, list):
        out = RecordList()
        for i, row in enumerate(data):
            location = f"{path}:[{i}]"
            try:
                out.records.append(_row_record(row, root, location, image_column, caption_column,
                                               allow_outside_root))
            except BadSample as bad:
                out.skipped.append((location, bad.reason))
        return merge_by_image(out)
    raise ValueError(f"{path}: expected a Karpathy split file ({{'images': [...]}}) or a list of records")


def _karpathy(images: list, path: Path, root: Path, split: str, allow_outside: bool = False) -> RecordList:
    wanted = KARPATHY_SPLITS.get(split, (split,))
    out = RecordList()
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or entry.get("split") not in wanted:
            continue
        location = f"{path}:images[{i}]"
        try:
            name = entry.get("filename")
            if not isinstance(name, str):
                raise BadSample("no 'filename'")
            folder = entry.get("filepath", "")
            image = confined_path(str(Path(folder if isinstance(folder, str) else "") / name), root, allow_outside)
            out.records.append({"image": image, "captions": clean_captions(entry.get("sentences")),
                                "location": location})
        except BadSample as bad:
            out.skipped.append((location, bad.reason))
    if not out.records and not out.skipped:
        present = sorted({e.get("split") for e in images if isinstance(e, dict) and e.get("split")})
        raise ValueError(f"{path}: no images with split in {wanted}; the file has splits {present} (FILE.json:SPLIT)")
    return out
