"""Data loading throughput: decoded and resized images/s per DataLoader worker count, vlzoo vs torchvision.

Two vlzoo sources read the same N JPEG files (generated here: gradients, blocks and
noise, 500x375, quality 90): a folder of JPEGs behind a JSONL annotation file
(``open_source(".../train.jsonl")`` -> ``ImageTextDataset``, map-style, shuffled) and
8 webdataset tar shards (``open_source(".../{00000..00007}.tar", "train")`` ->
``ImageTextStream``, the default shuffle buffer). Each item is decoded
(``vlzoo.data.images.decode``: RGB, EXIF, bicubic shortest-side resize, centre crop)
to a (3, S, S) uint8 tensor. The peer is a plain torchvision pipeline over the same
files: a map-style ``Dataset`` doing ``PIL.Image.open(path).convert("RGB")``, then
``Resize(S)`` (bicubic, as open_clip's and BLIP's preprocessing; ``--peer-interpolation
bilinear`` for torchvision's default), ``CenterCrop(S)``, ``PILToTensor()``. Every side's batches
are collated by the same function, which only stacks the images (no tokenizer,
no normalisation), so the figure is reading + decoding + resizing.

Per worker count, each side's ``DataLoader`` (``persistent_workers=False``, so a
pass includes starting and stopping its workers) is warmed up over a few batches,
then full passes are timed in alternation (ABBA, ``common.time_interleaved``);
figures are medians over ``--repeats``, ratios medians of back-to-back pairs (per
image: the stream yields whole batches per worker, so it may read a few images less
than N). The data is small and was just written or read, so it sits in the page
cache: this measures CPU cost, not the disk. The recommended worker count is the
smallest one within 10% of the best vlzoo folder throughput.

    python benchmarks/bench_data.py [--images 2000] [--image-size 224] [--workers 0,1,2]
        [--batch-size 64] [--repeats 1] [--data-dir DIR] [--out results.json]

With the defaults a run should take about 2.5 minutes on 2 cores (extrapolated from
200 images: a full pass is about 11 s a side per worker count, generating the data
about 25 s); ``--repeats 3`` gives steadier figures in about 6 minutes, and
``--data-dir`` keeps the data for the next run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from common import captions, cpu_model, ratio, set_threads, summary, time_interleaved, write_json
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vlzoo.data.image_text import ImageTextDataset, ImageTextStream
from vlzoo.data.images import decode
from vlzoo.data.sources import MapSource, SourceOptions, StreamSource, open_source

PEER = "torchvision"
SIDES = {"vlzoo_folder": "vlzoo folder (jsonl)", "vlzoo_webdataset": "vlzoo webdataset", PEER: "torchvision folder"}
SHARDS = 8
QUALITY = 90
WARMUP_BATCHES = 3
WITHIN = 0.10  # recommended workers: the fewest within 10% of the best folder throughput
SEED = 0


# ------------------------------------------------------------------------ data
def synthetic_image(rng: np.random.Generator, width: int, height: int, noise: np.ndarray) -> Image.Image:
    """A photo-like RGB image: a three-colour gradient, a few blended blocks, and a
    window of precomputed noise (so JPEG sizes and decode times are those of photos,
    not of flat colour)."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    a, b, c = rng.uniform(0, 255, (3, 1, 1, 3)).astype(np.float32)
    pixels = a * (1 - x) * (1 - y) + b * x + c * y * (1 - x)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(width)), int(rng.integers(height))
        w, h = (int(v) for v in rng.integers(20, max(21, min(width, height) // 2), 2))
        block = pixels[y0:y0 + h, x0:x0 + w]
        block *= 0.5
        block += rng.uniform(0, 127, 3).astype(np.float32)
    top, left = int(rng.integers(noise.shape[0] - height + 1)), int(rng.integers(noise.shape[1] - width + 1))
    pixels += noise[top:top + height, left:left + width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_data(directory: Path, count: int, width: int, height: int) -> dict[str, Any]:
    """``count`` JPEGs under ``directory/images``, ``train.jsonl`` naming them (paths
    relative to it) with one caption each, and the same images and captions in
    ``SHARDS`` tar shards (``KEY.jpg``, ``KEY.txt`` adjacent). Reused when
    ``directory/bench_data.json`` says it holds exactly these."""
    meta = {"images": count, "width": width, "height": height, "quality": QUALITY, "shards": SHARDS, "seed": SEED}
    marker = directory / "bench_data.json"
    layout = {"jsonl": str(directory / "train.jsonl"),
              "shards": str(directory / "shards" / f"{{00000..{SHARDS - 1:05d}}}.tar"),
              "paths": [str(directory / "images" / f"{i:06d}.jpg") for i in range(count)]}
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return {**layout, "generated_s": 0.0, "reused": True}
    start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    noise = rng.normal(0.0, 10.0, (2 * height, 2 * width, 3)).astype(np.float32)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    (directory / "shards").mkdir(exist_ok=True)
    texts = captions(count, seed=SEED)
    with open(layout["jsonl"], "w") as f:
        for i, path in enumerate(layout["paths"]):
            synthetic_image(rng, width, height, noise).save(path, "JPEG", quality=QUALITY)
            f.write(json.dumps({"image": f"images/{i:06d}.jpg", "caption": texts[i]}) + "\n")
    for shard, rows in enumerate(np.array_split(np.arange(count), SHARDS)):
        with tarfile.open(directory / "shards" / f"{shard:05d}.tar", "w") as tar:
            for i in rows:
                for name, data in ((f"{i:06d}.jpg", Path(layout["paths"][i]).read_bytes()),
                                   (f"{i:06d}.txt", texts[i].encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    marker.write_text(json.dumps(meta) + "\n")
    return {**layout, "generated_s": time.perf_counter() - start, "reused": False}


# ------------------------------------------------------------------------ the sides
class TorchvisionImages(Dataset):
    """The peer: image files through PIL and torchvision transforms."""

    def __init__(self, paths: list[str], size: int, interpolation: str = "bilinear"):
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode(interpolation)),
            transforms.CenterCrop(size),
            transforms.PILToTensor(),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def stack_images(items: list[Any]) -> torch.Tensor:
    """The collate function of every side: the images stacked, (B, 3, S, S) uint8 (no
    tokenizer, no normalisation)."""
    return torch.stack([item["image"] if isinstance(item, dict) else item for item in items])


def loaders(data: dict[str, Any], folder: MapSource, shards: StreamSource, args: argparse.Namespace,
            workers: int) -> dict[str, DataLoader]:
    """One ``DataLoader`` per side at ``workers`` workers (map-style sides shuffled
    alike)."""
    size, batch = args.image_size, args.batch_size
    common = {"batch_size": batch, "num_workers": workers, "persistent_workers": False, "collate_fn": stack_images}
    stream = ImageTextStream(shards, image_size=size, resize_mode="shortest", seed=SEED, rank=0, world=1,
                             workers=workers, batch_size=batch)
    return {
        "vlzoo_folder": DataLoader(ImageTextDataset(folder, train=True, image_size=size, resize_mode="shortest"),
                                   shuffle=True, generator=torch.Generator().manual_seed(SEED), **common),
        "vlzoo_webdataset": DataLoader(stream, drop_last=True, **common),
        PEER: DataLoader(TorchvisionImages(data["paths"], size, args.peer_interpolation), shuffle=True,
                         generator=torch.Generator().manual_seed(SEED), **common),
    }


def warm_up(loader: DataLoader, batches: int) -> None:
    """Start the loader's workers and read ``batches`` batches (page cache, imports)."""
    for i, _ in enumerate(loader):
        if i + 1 >= batches:
            break


def run_workers(data: dict[str, Any], folder: MapSource, shards: StreamSource, args: argparse.Namespace,
                workers: int) -> dict[str, Any]:
    """Every side at ``workers`` workers: warm-up, then ``repeats`` alternating full passes."""
    sides = loaders(data, folder, shards, args, workers)
    counts: dict[str, set[int]] = {name: set() for name in sides}

    def full_pass(name: str) -> None:
        counts[name].add(sum(batch.shape[0] for batch in sides[name]))

    for loader in sides.values():
        warm_up(loader, WARMUP_BATCHES)
    times = time_interleaved({name: lambda name=name: full_pass(name) for name in sides}, warmup=0,
                             repeats=args.repeats)
    out: dict[str, Any] = {"workers": workers}
    for name in sides:
        if len(counts[name]) != 1:
            raise RuntimeError(f"{name}: passes read different numbers of images: {sorted(counts[name])}")
        images = counts[name].pop()
        out[name] = {"images_per_pass": images, **summary(times[name], images)}
    for name in sides:
        if name != PEER:  # per-image seconds: the stream's pass may hold fewer images
            out[f"{name}_ratio"] = ratio([s / out[name]["images_per_pass"] for s in times[name]],
                                         [s / out[PEER]["images_per_pass"] for s in times[PEER]])
    return out


def pixel_difference(path: str, size: int, interpolation: str) -> float:
    """Mean absolute difference (0-255) of one image as vlzoo and the peer make it: the
    same crop, up to the resize filter."""
    ours = decode(path, size, "shortest").float()
    theirs = TorchvisionImages([path], size, interpolation)[0].float()
    return float((ours - theirs).abs().mean())


# ------------------------------------------------------------------------ report
def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fewest workers within ``WITHIN`` of the best vlzoo folder throughput."""
    best = max(rows, key=lambda r: r["vlzoo_folder"]["per_s"])
    threshold = (1 - WITHIN) * best["vlzoo_folder"]["per_s"]
    chosen = min((r for r in rows if r["vlzoo_folder"]["per_s"] >= threshold), key=lambda r: r["workers"])
    return {"workers": chosen["workers"], "per_s": chosen["vlzoo_folder"]["per_s"], "best_workers": best["workers"],
            "best_per_s": best["vlzoo_folder"]["per_s"], "within": WITHIN}


def print_rows(row: dict[str, Any]) -> None:
    for name, label in SIDES.items():
        side = row[name]
        vs = row.get(f"{name}_ratio")
        versus = f"{vs['ratio']:6.3f} ({vs['min']:.2f}-{vs['max']:.2f})" if vs else f"{1.0:6.3f}"
        print(f"{label:22s} {row['workers']:7d} {side['images_per_pass']:7d} {side['per_s']:9.1f} "
              f"({side['min_per_s']:.0f}-{side['max_per_s']:.0f})".ljust(60) + versus, flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on (the data-loading subset of ``common.machine``)."""
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "platform": platform.platform(), "load_average_1_5_15": list(os.getloadavg())}


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="JPEG images to generate and read (default 2000)")
    p.add_argument("--source-size", default="500x375", help="generated image size WxH (default 500x375)")
    p.add_argument("--image-size", type=int, default=224, help="output side S (default 224)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts (default 0,1,2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed passes per side and worker count (default 1: a pass reads every image)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="generate (or reuse) the data here instead of a temporary folder")
    p.add_argument("--peer-interpolation", choices=("bilinear", "bicubic"), default="bicubic",
                   help="torchvision Resize filter (default bicubic, like vlzoo and open_clip; bilinear is faster)")
    p.add_argument("--out", "--json", dest="out", type=Path, default=None, help="write the figures here as JSON")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the main process (default 1)")
    args = p.parse_args()
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    args.width, args.height = (int(v) for v in args.source_size.lower().split("x"))
    if not args.worker_counts or min(args.worker_counts) < 0:
        p.error("--workers: a comma-separated list of counts >= 0")
    set_threads(args.threads)
    return args


def main() -> None:
    args = arguments()
    with tempfile.TemporaryDirectory(prefix="vlzoo_bench_data_") as tmp:
        directory = args.data_dir or Path(tmp)
        data = write_data(directory, args.images, args.width, args.height)
        made = "reused" if data["reused"] else f"generated in {data['generated_s']:.1f} s"
        print(f"data: {args.images} JPEGs {args.width}x{args.height} q{QUALITY} + {SHARDS} shards in {directory} "
              f"({made}); "
              f"output {args.image_size}px, batch {args.batch_size}, {args.repeats} repeats, "
              f"{len(os.sched_getaffinity(0))} usable cores", flush=True)
        folder = open_source(data["jsonl"], "train", SourceOptions())
        shards = open_source(data["shards"], "train", SourceOptions())
        difference = pixel_difference(data["paths"][0], args.image_size, args.peer_interpolation)
        print(f"{'source':22s} {'workers':>7s} {'images':>7s} {'images/s':>9s} (min-max)".ljust(60)
              + f"vs {PEER} (min-max)", flush=True)
        rows = []
        for workers in args.worker_counts:
            rows.append(run_workers(data, folder, shards, args, workers))
            print_rows(rows[-1])
    best = recommend(rows)
    print(f"recommended workers: {best['workers']} ({best['per_s']:.1f} images/s; the fewest within "
          f"{WITHIN:.0%} of the best vlzoo folder throughput, {best['best_per_s']:.1f} images/s at "
          f"{best['best_workers']} workers)", flush=True)
    print(f"mean |vlzoo - {PEER}| pixel difference on one image: {difference:.2f} / 255 "
          f"(bicubic vs {args.peer_interpolation})", flush=True)
    if args.out:
        runs = [{"source": name.removeprefix("vlzoo_"), "workers": row["workers"], "vlzoo": row[name],
                 PEER: row[PEER], "ratio": row[f"{name}_ratio"]}
                for row in rows for name in SIDES if name != PEER]
        config = {k: getattr(args, k) for k in ("images", "width", "height", "image_size", "worker_counts",
                                                "batch_size", "repeats", "peer_interpolation", "threads")}
        write_json(args.out, {"benchmark": "data_loading", "peer": PEER,
                              "config": {**config, "quality": QUALITY, "shards": SHARDS,
                                         "warmup_batches": WARMUP_BATCHES,
                                         "shuffle_buffer": SourceOptions().shuffle_buffer},
                              "machine": machine(), "data_generated_s": data["generated_s"],
                              "pixel_mean_abs_difference": difference, "recommended": best, "runs": runs})


if __name__ == "__main__":
    main()
