"""The embedded ``shapes`` dataset: procedural scenes with compositional captions.

Every scene holds 1-3 objects (shape, colour, size) placed in a row or a column so
that the relations "left of / right of / above / below" are well defined. Each image
has five captions from varied templates, compositional hard negatives (the same words
bound wrongly) and VQA pairs. Everything is a pure function of ``(seed, split, index)``,
so a split is byte-identical on every machine; splits are cached as ``.npy`` + JSON
under ``$VLZOO_HOME/datasets/shapes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlzoo.utils import ProgressLines, vlzoo_home

FORMAT_VERSION = 2  # 2: no "a orange" (a caption template and the exists questions)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (50, 180, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 210),
    "orange": (250, 140, 20),
}
SIZES = ("small", "large")
SPLITS = ("train", "val", "test")
NUMBER_WORDS = ("zero", "one", "two", "three")
_RADIUS = {"small": 0.075, "large": 0.14}  # fraction of the image side
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; ``x``/``y`` are centres in [0, 1]."""

    shape: str
    colour: str
    size: str
    x: float = 0.5
    y: float = 0.5

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class Scene:
    """Objects ordered along ``axis`` (left-to-right or top-to-bottom)."""

    objects: tuple[ShapeObject, ...]
    axis: str = "horizontal"  # or "vertical"; irrelevant for one object

    @property
    def key(self) -> tuple:
        """What the captions describe: object attributes in order, and the axis."""
        axis = self.axis if len(self.objects) > 1 else "-"
        return (axis, tuple(o.key for o in self.objects))


# ----------------------------------------------------------------------------- captions


def _one_object_captions(a: ShapeObject) -> list[str]:
    return [
        f"a {a.phrase}",
        f"there is a {a.phrase}",
        f"a picture of a {a.phrase}",
        f"a {a.size} {a.shape} that is {a.colour}",  # "a" + size: never "a orange"
        f"one {a.phrase} on a dark background",
    ]


def _two_object_captions(a: ShapeObject, b: ShapeObject, axis: str) -> list[str]:
    if axis == "horizontal":
        return [
            f"a {a.phrase} to the left of a {b.phrase}",
            f"a {b.phrase} to the right of a {a.phrase}",
            f"there is a {b.phrase} right of a {a.phrase}",
            f"a {a.phrase} and a {b.phrase} from left to right",
            f"two shapes: a {a.phrase} left of a {b.phrase}",
        ]
    return [
        f"a {a.phrase} above a {b.phrase}",
        f"a {b.phrase} below a {a.phrase}",
        f"there is a {b.phrase} under a {a.phrase}",
        f"a {a.phrase} and a {b.phrase} from top to bottom",
        f"two shapes: a {a.phrase} on top of a {b.phrase}",
    ]


def _three_object_captions(a: ShapeObject, b: ShapeObject, c: ShapeObject, axis: str) -> list[str]:
    if axis == "horizontal":
        return [
            f"a {a.phrase} to the left of a {b.phrase}, which is left of a {c.phrase}",
            f"a {c.phrase} to the right of a {b.phrase}, which is right of a {a.phrase}",
            f"from left to right: a {a.phrase}, a {b.phrase} and a {c.phrase}",
            f"three shapes in a row: a {a.phrase}, a {b.phrase} and a {c.phrase}",
            f"there is a {b.phrase} between a {a.phrase} on the left and a {c.phrase} on the right",
        ]
    return [
        f"a {a.phrase} above a {b.phrase}, which is above a {c.phrase}",
        f"a {c.phrase} below a {b.phrase}, which is below a {a.phrase}",
        f"from top to bottom: a {a.phrase}, a {b.phrase} and a {c.phrase}",
        f"three shapes in a column: a {a.phrase}, a {b.phrase} and a {c.phrase}",
        f"there is a {b.phrase} between a {a.phrase} on top and a {c.phrase} at the bottom",
    ]


def captions_for(scene: Scene) -> list[str]:
    """Five captions, a deterministic function of ``scene.key``.

    Because identical scenes get identical caption sets, exact-string caption matching
    (used by retrieval evaluation) equals semantic matching on this dataset.
    """
    objs = scene.objects
    if len(objs) == 1:
        return _one_object_captions(objs[0])
    if len(objs) == 2:
        return _two_object_captions(objs[0], objs[1], scene.axis)
    return _three_object_captions(objs[0], objs[1], objs[2], scene.axis)


# ---------------------------------------------------------------------- hard negatives


def _swap_attribute(scene: Scene, attribute: str) -> Scene | None:
    """Swap ``attribute`` between the first pair of objects where it differs."""
    objs = list(scene.objects)
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            vi, vj = getattr(objs[i], attribute), getattr(objs[j], attribute)
            if vi != vj:
                objs[i] = replace(objs[i], **{attribute: vj})
                objs[j] = replace(objs[j], **{attribute: vi})
                return Scene(tuple(objs), scene.axis)
    return None


def _change_attribute(scene: Scene, attribute: str, rng: np.random.Generator) -> Scene:
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}[attribute]
    obj = scene.objects[0]
    others = [v for v in values if v != getattr(obj, attribute)]
    new = replace(obj, **{attribute: others[rng.integers(len(others))]})
    return Scene((new,), scene.axis)


def negatives_for(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """Compositional hard negatives: captions of the same words bound wrongly.

    Multi-object scenes: colours swapped, sizes swapped, shapes swapped between two
    objects, or the relation reversed. A single object has nothing to bind wrongly, so
    one of its attributes is changed instead. Each negative uses the first caption
    template, so the only difference to ``captions_for(scene)[0]`` is the binding.
    """
    candidates: list[tuple[str, Scene | None]] = []
    if len(scene.objects) == 1:
        for attribute in ("colour", "size", "shape"):
            candidates.append((f"change_{attribute}", _change_attribute(scene, attribute, rng)))
    else:
        for attribute in ("colour", "size", "shape"):
            candidates.append((f"swap_{attribute}", _swap_attribute(scene, attribute)))
        candidates.append(("reverse_relation", Scene(scene.objects[::-1], scene.axis)))
    true_caption = captions_for(scene)[0]
    negatives = []
    for kind, wrong in candidates:
        if wrong is None or wrong.key == scene.key:
            continue
        caption = captions_for(wrong)[0]
        if caption != true_caption:
            negatives.append({"caption": caption, "kind": kind})
    return negatives


# ------------------------------------------------------------------------------- VQA


def qa_for(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """Question/answer pairs with a question ``type`` (count, colour, shape, size, ...)."""
    objs = scene.objects
    qa = [{"question": "how many shapes are there?", "answer": NUMBER_WORDS[len(objs)], "type": "count"}]
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    for o in objs:
        if shapes.count(o.shape) == 1:
            qa.append({"question": f"what colour is the {o.shape}?", "answer": o.colour, "type": "colour"})
        if colours.count(o.colour) == 1:
            qa.append({"question": f"what shape is the {o.colour} object?", "answer": o.shape, "type": "shape"})
        qa.append({"question": f"what size is the {o.colour} {o.shape}?", "answer": o.size, "type": "size"})
    present = {(o.colour, o.shape) for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    c, s = absent[rng.integers(len(absent))]
    o = objs[rng.integers(len(objs))]
    qa.append({"question": f"is there a {o.shape} that is {o.colour}?", "answer": "yes", "type": "exists"})
    qa.append({"question": f"is there a {s} that is {c}?", "answer": "no", "type": "exists"})
    if len(objs) >= 2:
        a, b = objs[0], objs[1]
        before, after = ("left", "right") if scene.axis == "horizontal" else ("above", "below")
        qa.append({"question": f"where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?",
                   "answer": before, "type": "relation"})
        qa.append({"question": f"where is the {b.colour} {b.shape} relative to the {a.colour} {a.shape}?",
                   "answer": after, "type": "relation"})
    return qa


# --------------------------------------------------------------------------- sampling


def _sample_objects(rng: np.random.Generator, count: int) -> list[ShapeObject]:
    """``count`` objects with pairwise distinct (shape, colour, size)."""
    chosen: list[ShapeObject] = []
    while len(chosen) < count:
        obj = ShapeObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
            size=SIZES[rng.integers(len(SIZES))],
        )
        if all(obj.key != o.key for o in chosen):
            chosen.append(obj)
    return chosen


def _place(rng: np.random.Generator, objs: list[ShapeObject], axis: str) -> tuple[ShapeObject, ...] | None:
    """Positions with clear separation along ``axis`` and little offset across it."""
    radii = [_RADIUS[o.size] for o in objs]
    for _ in range(200):
        along = [rng.uniform(r + 0.02, 1 - r - 0.02) for r in radii]
        across = [rng.uniform(r + 0.02, 1 - r - 0.02) for r in radii]
        order = np.argsort(along)
        ok = True
        for k in range(len(objs) - 1):
            i, j = order[k], order[k + 1]
            gap = along[j] - along[i]
            if gap < radii[i] + radii[j] + 0.04 or abs(across[j] - across[i]) > 0.5 * gap:
                ok = False
                break
        if ok:
            placed = []
            for i in order:
                x, y = (along[i], across[i]) if axis == "horizontal" else (across[i], along[i])
                placed.append(replace(objs[i], x=float(x), y=float(y)))
            return tuple(placed)
    return None


def sample_scene(rng: np.random.Generator) -> Scene:
    """One random scene; objects are returned in canonical (axis) order."""
    while True:
        count = int(rng.integers(1, 4))
        axis = ("horizontal", "vertical")[rng.integers(2)]
        objs = _sample_objects(rng, count)
        placed = _place(rng, objs, axis)
        if placed is not None:
            return Scene(placed, axis)


# -------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + rr * np.cos(a), cy - rr * np.sin(a)) for a, rr in zip(angles, radii)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Draw ``scene`` into a (H, W, 3) uint8 array with a noisy dark background."""
    side = image_size * _SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(20, 70, size=3))
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        r = _RADIUS[o.size] * side * rng.uniform(0.9, 1.1)
        cx, cy = o.x * side, o.y * side
        colour = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[o.colour])
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=colour)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32)
    pixels += rng.normal(0.0, 8.0, size=pixels.shape)
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def generate_sample(seed: int, split: str, index: int, image_size: int = 64) -> tuple[np.ndarray, dict]:
    """The ``index``-th sample of ``split``: independent of the split's size."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = sample_scene(rng)
    image = render_scene(scene, rng, image_size)
    record = {
        "captions": captions_for(scene),
        "negatives": negatives_for(scene, rng),
        "qa": qa_for(scene, rng),
        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size} for o in scene.objects],
        "axis": scene.axis if len(scene.objects) > 1 else None,
    }
    return image, record


# ----------------------------------------------------------------------------- splits


@dataclass
class ShapesSplit:
    """A whole split in memory: ``images`` (N, H, W, 3) uint8 and one record per image."""

    images: np.ndarray
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)


def _cache_dir(seed: int, split: str, size: int, image_size: int) -> Path:
    spec = f"v{FORMAT_VERSION}-{split}-{size}-{image_size}-{seed}"
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return vlzoo_home() / "datasets" / "shapes" / f"{split}-{size}-{image_size}px-seed{seed}-{digest}"


def _generate_range(args: tuple[int, str, int, int, int]) -> tuple[np.ndarray, list[dict]]:
    seed, split, start, stop, image_size = args
    images = np.empty((stop - start, image_size, image_size, 3), dtype=np.uint8)
    records = []
    for k, i in enumerate(range(start, stop)):
        images[k], record = generate_sample(seed, split, i, image_size)
        records.append(record)
    return images, records


def build_split(split: str, size: int, image_size: int = 64, seed: int = 0, processes: int | None = None) -> ShapesSplit:
    """Generate ``split`` without touching the cache (in parallel for large splits).

    Every sample depends only on ``(seed, split, index)``, so the result is the same
    whatever the number of processes.
    """
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
    processes = processes or min(os.cpu_count() or 1, 8)
    chunk = 1000
    jobs = [(seed, split, s, min(s + chunk, size), image_size) for s in range(0, size, chunk)]
    progress = ProgressLines(f"generating shapes {split} split ({image_size} px):", size, "images") \
        if size > chunk else None
    parts = []
    if processes > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            for part in pool.imap(_generate_range, jobs):  # in order: the same split whatever the processes
                parts.append(part)
                if progress is not None:
                    progress.advance(len(part[1]))
    else:
        for job in jobs:
            parts.append(_generate_range(job))
            if progress is not None:
                progress.advance(len(parts[-1][1]))
    if not parts:
        return ShapesSplit(np.empty((0, image_size, image_size, 3), dtype=np.uint8), [])
    images = np.concatenate([p[0] for p in parts])
    records = [r for p in parts for r in p[1]]
    return ShapesSplit(images, records)


def load_split(split: str, size: int, image_size: int = 64, seed: int = 0, cache: bool = True) -> ShapesSplit:
    """Load ``split`` from the cache, generating (and atomically caching) it on a miss."""
    if not cache:
        return build_split(split, size, image_size, seed)
    directory = _cache_dir(seed, split, size, image_size)
    if (directory / "records.json").exists() and (directory / "images.npy").exists():
        images = np.load(directory / "images.npy", mmap_mode="r")
        records = json.loads((directory / "records.json").read_text())
        return ShapesSplit(images, records)
    if size > 1000:
        print(f"vlzoo: the shapes {split} split ({size} images, {image_size} px) is not cached: generating it once "
              f"into {directory}", file=sys.stderr, flush=True)
    data = build_split(split, size, image_size, seed)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-"))
    try:
        np.save(tmp / "images.npy", data.images)
        (tmp / "records.json").write_text(json.dumps(data.records))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process cached it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def export_split(split: ShapesSplit, out: str | os.PathLike, limit: int | None = None) -> Path:
    """Write PNG files and ``captions.jsonl`` (fields image, captions, negatives, qa)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    count = len(split) if limit is None else min(limit, len(split))
    with open(out / "captions.jsonl", "w") as f:
        for i in range(count):
            name = f"images/{i:06d}.png"
            Image.fromarray(np.asarray(split.images[i])).save(out / name)
            record = split.records[i]
            row = {"image": name, "captions": record["captions"], "negatives": record["negatives"],
                   "qa": record["qa"]}
            f.write(json.dumps(row) + "\n")
    return out / "captions.jsonl"


# Prompts and templates the zoo uses around shapes text (captioning prompts, zero-shot
# templates, VQA prompts), so that the shapes tokenizer knows their words.
PROMPT_TEXTS = ("a picture of", "a photo of a", "there is a", "Question: Answer:", "a {}")


def caption_corpus(seed: int = 0, size: int = 2000) -> list[str]:
    """Every word the captions, negatives and questions can use (for tokenizer training)."""
    texts = []
    for i in range(size):
        rng = np.random.default_rng([seed, 0, i])
        scene = sample_scene(rng)
        texts += captions_for(scene)
        texts += [n["caption"] for n in negatives_for(scene, rng)]
        texts += [q["question"] + " " + q["answer"] for q in qa_for(scene, rng)]
    return texts + list(PROMPT_TEXTS)


def zeroshot_classes() -> list[str]:
    """The zero-shot label set: colour + shape of single-object images (36 classes)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def zeroshot_label(record: dict) -> int | None:
    """Index into :func:`zeroshot_classes`, or ``None`` for multi-object images."""
    if len(record["objects"]) != 1:
        return None
    o = record["objects"][0]
    return zeroshot_classes().index(f"{o['colour']} {o['shape']}")
