"""The standard benchmarks' files, read from their official layouts under one folder
(``vlzoo eval --benchmark NAME --data PATH``).

========================  ===================================================================
benchmark                 what PATH holds
========================  ===================================================================
coco-retrieval,           the Karpathy split ``dataset_coco.json`` (test images, 5 captions each)
coco-caption              or LAVIS/BLIP's ``coco_karpathy_test.json``; the images under their
                          ``filepath`` (``val2014/...``)
flickr30k-retrieval       ``dataset_flickr30k.json`` (Karpathy; images in ``flickr30k-images/``)
                          or ``flickr30k_test.json``
nocaps                    ``nocaps_val_4500_captions.json``; images in ``validation/`` (or PATH)
vqav2                     ``v2_OpenEnded_mscoco_val2014_questions.json``,
                          ``v2_mscoco_val2014_annotations.json``, ``val2014/``; for ranking,
                          ``answer_list.json`` (BLIP's 3,128 answers)
imagenet-zeroshot         ImageNet val: 1,000 synset folders (``n01440764/...``), in PATH or
                          PATH/val; or a webdataset in CLIP_benchmark's layout
zeroshot                  any image folder with one sub-folder per class, or a CLIP_benchmark
                          webdataset (``classnames.txt``, optional
                          ``zeroshot_classification_templates.txt``, ``test/*.tar``)
========================  ===================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlzoo.data.webdataset import TarMember, index_shard
from vlzoo.eval.formats import read_lines, read_vqa
from vlzoo.utils import read_json_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # any case
WDS_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


class BenchmarkDataError(ValueError):
    """Benchmark data that is missing or not in its official layout."""


@dataclass
class ImageTextSet:
    """Images (paths), their reference captions and ids (retrieval and captioning)."""

    images: list[Path]
    captions: list[list[str]]
    image_ids: list[Any]
    domains: list[str] = field(default_factory=list)
    source: Path | None = None


@dataclass
class QuestionSet:
    """VQA questions with their images and human answers."""

    question_ids: list[Any]
    images: list[Path]
    questions: list[str]
    answers: list[list[str]]
    answer_types: list[str]
    question_types: list[str]
    answer_list: list[str] | None = None


@dataclass
class ClassificationSet:
    """Labelled images (paths, or bytes read from webdataset shards), class names and, when
    the data brings them, its own templates."""

    images: list[Path | TarMember]
    labels: list[int]
    classnames: list[str]
    templates: list[str] | None = None
    names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unreadable parts of the data, named


def _first_existing(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise BenchmarkDataError(f"{root}: no {what} found (looked for {', '.join(names)})")


def _image_id(name: str) -> Any:
    """COCO's numeric image id from ``COCO_val2014_000000391895.jpg``; else the file stem."""
    stem = Path(name).stem
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else stem


def _check_images(images: list[Path], source: Path) -> None:
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise BenchmarkDataError(f"{source}: {len(missing)} of its {len(images)} images are not on disk, e.g. "
                                 f"{missing[0]} (expected the images beside the annotation file, in the official "
                                 "layout)")


def _check_unique(ids: list, path: Path) -> None:
    seen: set = set()
    for i in ids:
        if i in seen:
            raise BenchmarkDataError(f"{path}: image {i!r} is listed more than once (expected one entry per image)")
        seen.add(i)


def karpathy_split(root: Path, names: tuple[str, ...], default_dir: str, split: str = "test") -> ImageTextSet:
    """A Karpathy split file (``dataset_*.json``: images with ``split``, ``filepath``,
    ``filename``, ``sentences``) or LAVIS's test list (``[{"image", "caption": [...]}]``)."""
    path = _first_existing(root, names, "Karpathy split file")
    value = read_json_file(path, "a Karpathy split file")
    if isinstance(value, dict) and isinstance(value.get("images"), list):
        rows = [im for im in value["images"] if isinstance(im, dict) and im.get("split") == split]
        if not rows:
            raise BenchmarkDataError(f"{path}: no images with split {split!r}")
        try:
            images = [root / im.get("filepath", default_dir) / im["filename"] for im in rows]
            captions = [[s["raw"].strip() for s in im["sentences"]] for im in rows]
        except (KeyError, TypeError) as err:
            raise BenchmarkDataError(f"{path}: an image entry lacks {err} (expected 'filename' and "
                                     "'sentences': [{'raw': ...}])") from err
        ids = [im.get("cocoid", im.get("imgid", _image_id(im["filename"]))) for im in rows]
    elif isinstance(value, list):
        try:
            images = [root / row["image"] for row in value]
            captions = [[row["caption"]] if isinstance(row["caption"], str) else list(row["caption"])
                        for row in value]
        except (KeyError, TypeError) as err:
            raise BenchmarkDataError(f"{path}: an entry lacks {err} (expected {{'image', 'caption'}})") from err
        ids = [_image_id(row["image"]) for row in value]
    else:
        raise BenchmarkDataError(f"{path}: expected a Karpathy split file or a list of {{'image', 'caption'}}")
    _check_images(images, path)
    _check_unique(ids, path)
    return ImageTextSet(images, captions, ids, source=path)


def coco_karpathy(root: Path) -> ImageTextSet:
    return karpathy_split(root, ("dataset_coco.json", "coco_karpathy_test.json"), "val2014")


def flickr30k_karpathy(root: Path) -> ImageTextSet:
    return karpathy_split(root, ("dataset_flickr30k.json", "flickr30k_test.json"), "flickr30k-images")


def nocaps_val(root: Path) -> ImageTextSet:
    """nocaps validation: COCO-format captions with a ``domain`` per image."""
    path = _first_existing(root, ("nocaps_val_4500_captions.json",), "nocaps annotation file")
    value = read_json_file(path, "a nocaps annotation file (COCO format) object")
    images_dir = root / "validation" if (root / "validation").is_dir() else root
    captions: dict[Any, list[str]] = {}
    for ann in value.get("annotations", []):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    rows = [im for im in value.get("images", []) if im.get("id") in captions]
    if not rows:
        raise BenchmarkDataError(f"{path}: no captioned images (expected 'images' and 'annotations')")
    images = [images_dir / im["file_name"] for im in rows]
    _check_images(images, path)
    _check_unique([im["id"] for im in rows], path)
    return ImageTextSet(images, [captions[im["id"]] for im in rows], [im["id"] for im in rows],
                        [im.get("domain", "all") for im in rows], source=path)


def vqav2_val(root: Path) -> QuestionSet:
    """VQAv2 val (or any set in its format) with the images under ``val2014/``."""
    questions_path = _first_existing(root, ("v2_OpenEnded_mscoco_val2014_questions.json",), "VQAv2 questions file")
    annotations_path = _first_existing(root, ("v2_mscoco_val2014_annotations.json",), "VQAv2 annotations file")
    questions = read_vqa(questions_path, annotations_path)
    images_dir = root / "val2014"
    images = [images_dir / f"COCO_val2014_{int(q.image_id):012d}.jpg" for q in questions.values()]
    _check_images(sorted(set(images)), questions_path)
    answer_list = None
    if (root / "answer_list.json").is_file():
        answer_list = read_json_file(root / "answer_list.json", "a JSON list of answers")
        if not isinstance(answer_list, list) or not all(isinstance(a, str) for a in answer_list) or not answer_list:
            raise BenchmarkDataError(f"{root / 'answer_list.json'}: expected a non-empty JSON list of answer strings")
    qs = list(questions.values())
    return QuestionSet(list(questions), images, [q.question for q in qs], [q.answers for q in qs],
                       [q.answer_type for q in qs], [q.question_type for q in qs], answer_list)


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder(root: Path, classnames: list[str] | None = None) -> ClassificationSet:
    """One sub-folder per class (sorted names = label order); class names from the folder
    names (``_`` read as a space) unless given."""
    folders = _class_folders(root)
    if not folders:
        raise BenchmarkDataError(f"{root}: no class folders (expected one sub-folder of images per class)")
    if classnames is not None and len(classnames) != len(folders):
        raise BenchmarkDataError(f"{root}: {len(folders)} class folders but {len(classnames)} class names given")
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        images += files
        labels += [label] * len(files)
    if not images:
        raise BenchmarkDataError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    names = classnames or [f.name.replace("_", " ") for f in folders]
    return ClassificationSet(images, labels, names, names=[f.name for f in folders])


def imagenet_val(root: Path) -> ClassificationSet:
    """ImageNet-1k val with synset folders, labelled in sorted-synset order with OpenAI's
    class names."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if is_webdataset(root):
        return webdataset(root, list(IMAGENET_CLASSNAMES))
    root = root / "val" if (root / "val").is_dir() else root
    folders = _class_folders(root)
    if len(folders) != len(IMAGENET_CLASSNAMES) or not all(f.name.startswith("n") for f in folders):
        raise BenchmarkDataError(f"{root}: expected ImageNet val's {len(IMAGENET_CLASSNAMES)} synset folders "
                                 f"(n01440764, ...), found {len(folders)} folders")
    return image_folder(root, list(IMAGENET_CLASSNAMES))


def is_webdataset(root: Path) -> bool:
    return (root / "classnames.txt").is_file() and any(root.glob("test/*.tar"))


def webdataset(root: Path, classnames: list[str] | None = None) -> ClassificationSet:
    """CLIP_benchmark's layout: ``classnames.txt``, optional
    ``zeroshot_classification_templates.txt`` and ``test/*.tar`` with ``cls`` and an image."""
    names = classnames or read_lines(root / "classnames.txt", "class names")
    templates_file = root / "zeroshot_classification_templates.txt"
    templates = read_lines(templates_file, "templates") if templates_file.is_file() else None
    images: list[Path | TarMember] = []
    labels: list[int] = []
    skipped: list[str] = []
    for shard in sorted(root.glob("test/*.tar")):
        samples, corrupt = index_shard(str(shard))
        skipped += [f"{where}: {why}" for where, why in corrupt]
        for where, members in samples:
            key = next((k for k in WDS_IMAGE_KEYS if k in members), None)
            if key is None or "cls" not in members:
                raise BenchmarkDataError(f"{where}: the sample has {sorted(members)}; expected 'cls' and an image "
                                         f"({', '.join(WDS_IMAGE_KEYS)})")
            text = members["cls"].decode(errors="replace").strip()
            if not text.isdigit() or not int(text) < len(names):
                raise BenchmarkDataError(f"{where}: class {text!r}; expected an integer in 0..{len(names) - 1} "
                                         "(one per line of classnames.txt)")
            images.append(members[key])
            labels.append(int(text))
    if not images:
        raise BenchmarkDataError(f"{root}: the test/*.tar shards hold no samples")
    return ClassificationSet(images, labels, names, templates, skipped=skipped)


def classification_set(root: Path, classnames: list[str] | None = None) -> ClassificationSet:
    return webdataset(root, classnames) if is_webdataset(root) else image_folder(root, classnames)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: what it scores (``kind``: retrieval, caption, vqa, zeroshot), how its
    data is read and the layout it expects (metric keys: :mod:`vlzoo.eval.names`)."""

    kind: str
    read: Any
    layout: str

    def describe(self, dataset: Any) -> str:
        if isinstance(dataset, ImageTextSet):
            return f"{len(dataset.images)} images, {sum(map(len, dataset.captions))} captions"
        if isinstance(dataset, QuestionSet):
            return f"{len(dataset.question_ids)} questions about {len(set(dataset.images))} images"
        return f"{len(dataset.images)} images of {len(dataset.classnames)} classes"


BENCHMARKS: dict[str, Benchmark] = {
    "coco-retrieval": Benchmark("retrieval", coco_karpathy, "dataset_coco.json or coco_karpathy_test.json, val2014/"),
    "flickr30k-retrieval": Benchmark("retrieval", flickr30k_karpathy,
                                     "dataset_flickr30k.json or flickr30k_test.json, flickr30k-images/"),
    "coco-caption": Benchmark("caption", coco_karpathy, "dataset_coco.json or coco_karpathy_test.json, val2014/"),
    "nocaps": Benchmark("caption", nocaps_val, "nocaps_val_4500_captions.json, validation/"),
    "vqav2": Benchmark("vqa", vqav2_val, "v2_OpenEnded_mscoco_val2014_questions.json, "
                       "v2_mscoco_val2014_annotations.json, val2014/, answer_list.json"),
    "imagenet-zeroshot": Benchmark("zeroshot", imagenet_val, "ImageNet val synset folders (or val/), or a "
                                   "CLIP_benchmark webdataset"),
    "zeroshot": Benchmark("zeroshot", classification_set, "one folder per class, or a CLIP_benchmark webdataset "
                          "(classnames.txt, test/*.tar)"),
}
