"""Image-caption records from a JSONL file: one ``{"image": PATH, "caption(s)": ...}`` a line.

``image`` is relative to the file (or absolute); ``caption`` is a string or
``captions`` a list of strings. Malformed lines raise an error naming file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def read_caption_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records ``{"image": absolute Path, "captions": list[str], **other fields}``."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            records.append(_record(row, path, number))
    return records


def _record(row: Any, path: Path, number: int) -> dict[str, Any]:
    where = f"{path}:{number}"
    if not isinstance(row, dict) or not isinstance(row.get("image"), str):
        raise ValueError(f"{where}: expected an object with a string field 'image'")
    captions = row.get("captions", [row["caption"]] if "caption" in row else None)
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: expected 'caption' (a string) or 'captions' (a list of strings)")
    image = Path(row["image"])
    return {**row, "image": image if image.is_absolute() else path.parent / image, "captions": captions}


def read_rgb(path: str | Path) -> Tensor:
    """An image file -> (3, H, W) uint8 RGB tensor (raises on missing or undecodable files)."""
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
