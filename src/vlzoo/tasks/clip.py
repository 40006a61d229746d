"""CLIP as a LightningModule: InfoNCE or SigLIP, logit scale clamped after each step."""

from __future__ import annotations

from torch import Tensor

from vlzoo.config import CLIPConfig, EvalConfig, FinetuneConfig, OptimConfig, as_config
from vlzoo.losses import clip_loss, siglip_loss
from vlzoo.models.builders import build_clip
from vlzoo.tasks.base import VLTask, record_resolved_tower, resolved_tower


class CLIPTask(VLTask):
    """Trains :class:`~vlzoo.models.CLIP`; features are gathered over ranks with gradient."""

    family = "clip"

    def __init__(
        self,
        model: CLIPConfig = CLIPConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    ):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        config, load_tower = resolved_tower(as_config(model, CLIPConfig, "model"))
        self.config = config
        self.model, self.tokenizer = build_clip(config)
        load_tower(self.model)
        record_resolved_tower(self, model, config)
        self.preprocess_config = config.vision

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        if self.config.loss == "siglip":
            loss = siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
        else:
            loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", out.logit_scale.detach())
        return loss

    def after_optimizer_step(self, applied: Tensor | None = None) -> None:  # a skipped step: clamping changes nothing
        self.model.clamp_logit_scale()

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)
