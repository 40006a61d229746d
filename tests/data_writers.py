"""Small image-caption datasets the data tests write: PNG/JPEG files, JSONL, CSV,
Karpathy JSON, webdataset shards (with tarfile), ``datasets`` folders."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "white", "black", "grey", "yellow", "purple"]


def image_bytes(i: int, size: tuple[int, int] = (20, 14), fmt: str = "PNG") -> bytes:
    """A small uniform image whose colour encodes ``i`` (R = i % 256, G = i // 256)."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, :] = (i % 256, i // 256, 90)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def caption(i: int) -> str:
    return f"picture number {i} in {COLOURS[i % len(COLOURS)]}"


def write_images(root: Path, count: int, folder: str = "images") -> list[str]:
    """``count`` PNG files under ``root/folder``; returns their paths relative to ``root``."""
    (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{folder}/{i:05d}.png"
        (root / name).write_bytes(image_bytes(i))
        names.append(name)
    return names


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def caption_rows(names: list[str], captions_per_image: int = 1) -> list[dict]:
    if captions_per_image == 1:
        return [{"image": n, "caption": caption(i)} for i, n in enumerate(names)]
    return [{"image": n, "captions": [f"{caption(i)} (take {k})" for k in range(captions_per_image)]}
            for i, n in enumerate(names)]


def write_shards(directory: Path, count: int, per_shard: int, start: int = 0) -> list[Path]:
    """webdataset shards ``directory/00000.tar ...``: members ``KEY.png`` + ``KEY.txt``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((count + per_shard - 1) // per_shard):
        path = directory / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start + shard * per_shard, start + min(count, (shard + 1) * per_shard)):
                for extension, data in (("png", image_bytes(i)), ("txt", caption(i).encode())):
                    add_member(tar, f"{i:06d}.{extension}", data)
        paths.append(path)
    return paths


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pixel_id(image) -> int:
    """The ``i`` that :func:`image_bytes` encoded, read back from a (3, H, W) tensor."""
    return int(image[0].float().mean().round()) + 256 * int(image[1].float().mean().round())
