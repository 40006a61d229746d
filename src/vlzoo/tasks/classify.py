"""Image classification by fine-tuning a CLIP: a linear head on the normalised image
embedding, initialised from the zero-shot classifier (the class prompts' text
embeddings, as in WiSE-FT), trained with cross-entropy on labelled images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.config import CLIPConfig, EvalConfig, FinetuneConfig, OptimConfig, as_config
from vlzoo.eval.evaluator import ClassificationEvaluator
from vlzoo.models.builders import build_clip
from vlzoo.models.clip import CLIPClassifier
from vlzoo.tasks.base import VLTask, resolved_tower

HEAD_INITS = ("zeroshot", "random")


class ClassifyTask(VLTask):
    """Fine-tunes a CLIP for classification; ``{stage}/acc`` and ``{stage}/top5_acc``.

    ``classes``: the class names (default: the training data's, see
    :meth:`~vlzoo.data.datamodule.VLDataModule.class_names`). ``head_init``:
    ``zeroshot`` (from the class prompts ``eval.zeroshot_templates``) or ``random``.
    """

    family = "clip"

    monitor = "val/acc"
    uses_labels = True

    def __init__(
        self,
        model: CLIPConfig = CLIPConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
        classes: list[str] | None = None,
        head_init: str = "zeroshot",
    ):
        super().__init__(optim, eval, finetune)
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.save_hyperparameters()
        model = as_config(model, CLIPConfig, "model")
        self.config, self.head_init = model, head_init
        model, load_tower = resolved_tower(model)
        clip, self.tokenizer = build_clip(model)
        load_tower(clip)
        self._clip = (clip,)  # not a registered submodule: its parameters live in self.model
        self.preprocess_config = model.vision
        self.classes: list[str] = []
        if classes:
            self._build_head(list(classes))

    def _build_head(self, classes: list[str]) -> None:
        if len(set(classes)) != len(classes):
            raise ValueError("classes: the class names must be unique")
        self.classes = classes
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.model = CLIPClassifier(self._clip[0], len(classes))
        for name, p in self.model.named_parameters():  # the text side only initialises the head
            if not name.startswith(("vision.", "image_projection.", "head.")):
                p.requires_grad_(False)
        self.hparams["classes"] = classes  # a checkpoint rebuilds the same head

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self.classes:
            self._build_head(self.trainer.datamodule.class_names())

    def initial_state(self, parts) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """A CLIP's weights (the head stays to be initialised), or a classifier's with its head."""
        state, allow = super().initial_state(parts)
        if "head.weight" in state and state["head.weight"].shape[0] != len(self.classes):
            raise ValueError(f"finetune.init_from {parts.source}: its head has {state['head.weight'].shape[0]} "
                             f"classes, this task {len(self.classes)}")
        self._init_has_head = "head.weight" in state
        if self._init_has_head and parts.extra.get("classes") not in (None, self.classes):
            raise ValueError(f"finetune.init_from {parts.source}: its head is over other classes "
                             f"({parts.extra['classes'][:5]}...) than this task's ({self.classes[:5]}...)")
        return state, (*allow, "head.")

    def load_initial_weights(self, parts=None) -> None:
        super().load_initial_weights(parts)
        if self.head_init == "zeroshot" and not self._init_has_head:
            self.model.set_zeroshot_head(self.class_embeddings(self.classes))

    def labels_tensor(self, names: list[str]) -> Tensor:
        unknown = sorted({n for n in names if n not in self.class_index})
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the {len(self.classes)} classes of this model")
        return torch.tensor([self.class_index[n] for n in names], device=self.device)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self.model(batch["pixel_values"])
        loss = F.cross_entropy(logits, self.labels_tensor(batch["labels"]))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)

    def make_evaluator(self) -> ClassificationEvaluator:
        return ClassificationEvaluator(self)

    def class_logits(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C) logits over ``self.classes``."""
        return self.model(pixel_values)

    @torch.no_grad()
    def predict_classes(self, pixel_values: Tensor) -> Tensor:
        """(B, C) class probabilities."""
        return self.model(pixel_values).softmax(-1)
