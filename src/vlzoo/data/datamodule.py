"""One LightningDataModule for every family: image-caption pairs plus eval annotations."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlzoo.data import shapes as shapes_data
from vlzoo.data.tokenizers import Tokenizer

SPLIT_OF_STAGE = {"fit": "train", "train": "train", "val": "val", "validate": "val", "test": "test", "predict": "test"}


@dataclass
class ShapesConfig:
    """Sizes and seed of the embedded shapes splits."""

    image_size: int = 64
    train_size: int = 20000
    val_size: int = 500
    test_size: int = 1000
    seed: int = 0
    cache: bool = True


@dataclass
class EvalAnnotations:
    """What evaluation needs beyond the images.

    captions: per image, all reference captions; negatives: per image, hard-negative
    captions (each to be scored against ``captions[i][0]``); zeroshot_labels: per
    image a class index or None; zeroshot_classes: class names; qa: per image, its
    question/answer pairs.
    """

    captions: list[list[str]]
    negatives: list[list[str]] = field(default_factory=list)
    zeroshot_labels: list[int | None] = field(default_factory=list)
    zeroshot_classes: list[str] = field(default_factory=list)
    qa: list[list[dict[str, str]]] = field(default_factory=list)  # per image: question, answer, type


class ShapesDataset(Dataset):
    """Items ``{"image": (3, H, W) uint8, "index": int}`` plus one random ``caption`` when
    training, and one random ``qa`` pair (question, answer, type) when ``with_qa``."""

    def __init__(self, split: shapes_data.ShapesSplit, train: bool, with_qa: bool = False):
        self.split = split
        self.train = train
        self.with_qa = with_qa

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = torch.from_numpy(np.array(self.split.images[i])).permute(2, 0, 1)  # (3, H, W) uint8
        item: dict[str, Any] = {"image": image, "index": i}
        if self.train:
            captions = self.split.records[i]["captions"]
            item["caption"] = captions[int(torch.randint(len(captions), ()))]
            if self.with_qa:
                qa = self.split.records[i]["qa"]
                item["qa"] = qa[int(torch.randint(len(qa), ()))]
        return item


def preprocess_images(images: Tensor, image_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, S, S): scaled to [0, 1], resized (bicubic,
    antialiased) when H, W differ from S, normalised with mean/std of shape (1, 3, 1, 1)."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp_(0, 1)
    return (x - mean) / std


class ImageTextCollator:
    """Stacks images, resizes and normalises them, and tokenizes captions.

    Returns ``pixel_values`` (B, 3, S, S) float, ``index`` (B,), and when captions are
    present ``input_ids``/``attention_mask`` (B, L) and the strings ``captions``; with QA
    pairs, the strings ``questions`` and ``answers``.
    """

    def __init__(self, tokenizer: Tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        images = torch.stack([it["image"] for it in items])  # (B, 3, H, W) uint8
        batch = {
            "pixel_values": preprocess_images(images, self.image_size, self.mean, self.std),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        if "caption" in items[0]:
            batch["captions"] = [it["caption"] for it in items]
            batch.update(self.tokenizer(batch["captions"]))
        if "qa" in items[0]:
            batch["questions"] = [it["qa"]["question"] for it in items]
            batch["answers"] = [it["qa"]["answer"] for it in items]
        return batch


class VLDataModule(L.LightningDataModule):
    """Image-text data for every family.

    Args:
        train, val, test: data sources per split; ``shapes`` is the embedded dataset.
        shapes: sizes and seed of the shapes splits.
        batch_size: training batch per process; eval_batch_size: evaluation batch.
        num_workers: DataLoader worker processes.

    The tokenizer and image preprocessing come from the model being trained (its
    ``tokenizer`` and ``preprocess_config``), or from :meth:`attach`; a model with
    ``uses_qa = True`` also gets one QA pair per training item.
    """

    def __init__(
        self,
        train: str = "shapes",
        val: str = "shapes",
        test: str = "shapes",
        shapes: ShapesConfig = ShapesConfig(),  # noqa: B008 (jsonargparse needs a default instance)
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
    ):
        super().__init__()
        for name, source in (("train", train), ("val", val), ("test", test)):
            if source != "shapes":
                raise ValueError(f"data.{name}: unsupported source {source!r}; this version reads 'shapes'")
        self.sources = {"train": train, "val": val, "test": test}
        self.shapes = shapes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._splits: dict[str, shapes_data.ShapesSplit] = {}
        self.collator: ImageTextCollator | None = None
        self.with_qa = False
        self._annotations: dict[str, EvalAnnotations] = {}
        self._answer_prior: dict[str, str] | None = None

    def attach(self, tokenizer: Tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the tokenizer and preprocessing explicitly (when no Trainer/model is attached)."""
        self.collator = ImageTextCollator(tokenizer, image_size, mean, std)

    def _split(self, name: str) -> shapes_data.ShapesSplit:
        if name not in self._splits:
            size = getattr(self.shapes, f"{name}_size")
            self._splits[name] = shapes_data.load_split(
                name, size, self.shapes.image_size, self.shapes.seed, self.shapes.cache
            )
        return self._splits[name]

    def prepare_data(self) -> None:
        for name in ("train", "val", "test"):  # generate and cache once, on one process
            shapes_data.load_split(name, getattr(self.shapes, f"{name}_size"), self.shapes.image_size,
                              self.shapes.seed, self.shapes.cache)

    def setup(self, stage: str | None = None) -> None:
        if self.collator is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "tokenizer"):
                raise RuntimeError("VLDataModule needs a model with a tokenizer, or attach(...) first")
            pre = module.preprocess_config
            self.attach(module.tokenizer, pre.image_size, pre.mean, pre.std)
            self.with_qa = bool(getattr(module, "uses_qa", False))

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            ShapesDataset(self._split(split), train=train, with_qa=train and self.with_qa),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def annotations(self, stage: str) -> EvalAnnotations:
        """Captions, hard negatives, zero-shot labels and QA pairs of the split behind
        ``stage``; built once per split (callers must not modify them)."""
        split = SPLIT_OF_STAGE[stage]
        if split not in self._annotations:
            records = self._split(split).records
            self._annotations[split] = EvalAnnotations(
                captions=[r["captions"] for r in records],
                negatives=[[n["caption"] for n in r["negatives"]] for r in records],
                zeroshot_labels=[shapes_data.zeroshot_label(r) for r in records],
                zeroshot_classes=shapes_data.zeroshot_classes(),
                qa=[r["qa"] for r in records],
            )
        return self._annotations[split]

    def answer_prior(self) -> dict[str, str]:
        """Question type -> the most common answer of that type in the training split
        (the VQA baseline; computed on first use, so other families never read it)."""
        if self._answer_prior is None:
            counts: dict[str, Counter] = {}
            for record in self._split("train").records:
                for qa in record["qa"]:
                    counts.setdefault(qa["type"], Counter())[qa["answer"]] += 1
            self._answer_prior = {t: c.most_common(1)[0][0] for t, c in counts.items()}
        return self._answer_prior
