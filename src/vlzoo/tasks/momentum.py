"""ALBEF and BLIP as LightningModules: EMA + enqueue after each optimizer step,
two-stage (ITC, then ITM) retrieval evaluation, caption metrics for BLIP."""

from __future__ import annotations

import torch
from torch import Tensor

from vlzoo.config import (
    ALBEFConfig,
    BLIPConfig,
    EvalConfig,
    FinetuneConfig,
    MomentumConfig,
    OptimConfig,
    as_config,
)
from vlzoo.distributed import world_size
from vlzoo.eval.evaluator import TwoStageEvaluator
from vlzoo.layers.transformer import right_pad
from vlzoo.models.builders import build_albef, build_blip, prompt_prefix
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks.base import VLTask, record_resolved_tower, resolved_tower


class TwoStageRetrievalTask(VLTask):
    """The families with an ITM head (ALBEF, BLIP, BLIP-2), evaluated by a
    :class:`~vlzoo.eval.evaluator.TwoStageEvaluator` (ITC, then the top k reranked by
    ITM); this class gives it the model's ITC and ITM. ``captions``: also caption every
    evaluation image (BLIP, BLIP-2)."""

    captions = False

    def make_evaluator(self) -> TwoStageEvaluator:
        return TwoStageEvaluator(self, self.eval_config, captions=self.captions)

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)

    def image_tokens_and_embeds(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> the tokens ITM reads (B, N, Dv) and the ITC embeddings."""
        return self.model.image_tokens_and_feat(pixel_values)

    def itm_logits(self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """(P, L) texts with (P, N, Dv) image tokens -> (P, 2) no-match / match logits."""
        return self.model.itm_logits(input_ids, attention_mask, image_tokens)

    def temperature(self) -> float:
        """The learned ITC temperature."""
        temp = self.model.temp
        return float(temp.full_tensor() if hasattr(temp, "full_tensor") else temp)  # FSDP2: every rank evaluates

    def score_pairs(self, images: dict[str, Tensor], rows: Tensor, texts: list[str]) -> Tensor:
        """ITM score of image ``rows[i]`` (its ``tokens`` in ``images``) with ``texts[i]`` -> (P,)."""
        return self.evaluator.score_pairs(images, rows, texts)


class CaptionEvalMixin:
    """For captioners (BLIP, BLIP-2): evaluation captions every image from the image
    tokens already computed (``self.model.generate_from_tokens``, decoding
    ``self.generation``) and adds ``bleu4``/``cider`` against all references."""

    captions = True

    def caption_ids_from_tokens(self, image_tokens: Tensor) -> Tensor:
        """(B, N, Dv) -> (B, ``generation.max_length``) caption ids, right-padded."""
        ids = self.model.generate_from_tokens(image_tokens, config=self.generation)
        return right_pad(ids, self.generation.max_length, self.tokenizer.info.pad_id)  # every batch concatenates

    def decode(self, ids: Tensor) -> str:
        return self.tokenizer.decode(ids)


class MomentumTask(TwoStageRetrievalTask):
    """Shared by ALBEF and BLIP: alpha ramp, EMA and enqueue once per optimizer step."""

    config: MomentumConfig

    def __init__(self, optim: OptimConfig, eval: EvalConfig, finetune: FinetuneConfig | None = None):
        super().__init__(optim, eval, finetune)
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []

    def initial_state(self, parts) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """The starting model's weights and queue features, with the queue's sample ids
        cleared: the new data's sample i is not the pretraining data's sample i (an id
        kept would make unrelated queued features false ITC positives)."""
        state, allow = super().initial_state(parts)
        state = dict(state)
        for key in [k for k in state if k.endswith("queue.index")]:
            state[key] = torch.full_like(state[key], -1)
        for key in [k for k in state if k.endswith("queue.ptr")]:
            state[key] = torch.zeros_like(state[key])
        return state, allow

    def on_fit_start(self) -> None:
        self.model.queue.check_global_batch(self.trainer.datamodule.batch_size * world_size())  # fail before step 1

    def alpha(self) -> float:
        """Distillation weight: ``alpha`` ramped linearly over the first epoch (or
        ``alpha_ramp_steps``)."""
        ramp = self.config.alpha_ramp_steps
        if ramp is None:
            ramp = max(1, int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches)
        return self.config.alpha * min(1.0, self.global_step / max(1, ramp))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["index"],
                         alpha=self.alpha())
        self._pending.append((out.image_feat_m.detach(), out.text_feat_m.detach(), out.index))
        loss = self.total_loss(out.losses)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in out.losses.items()})
        self.log("train/temperature", self.model.temp.detach())
        return loss

    def skip_optimizer_step(self) -> None:
        self._pending.clear()  # features of a step that was not taken (maybe NaN) never reach the queue
        super().skip_optimizer_step()

    def after_optimizer_step(self, applied: Tensor | None = None) -> None:
        self.model.clamp_temperature()
        self.model.momentum_update(applied)
        for image_feat, text_feat, index in self._pending:  # every micro-batch of this step
            self.model.enqueue(image_feat, text_feat, index, applied)
        self._pending.clear()


class ALBEFTask(MomentumTask):
    """Trains :class:`~vlzoo.models.ALBEF` with ITC + ITM + MLM."""

    family = "albef"

    def __init__(
        self,
        model: ALBEFConfig = ALBEFConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    ):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        self.config, load_tower = resolved_tower(as_config(model, ALBEFConfig, "model"))
        self.model, self.tokenizer = build_albef(self.config)
        load_tower(self.model)
        record_resolved_tower(self, model, self.config)
        self.preprocess_config = self.config.vision


class BLIPTask(CaptionEvalMixin, MomentumTask):
    """Trains :class:`~vlzoo.models.BLIP` with ITC + ITM + LM; evaluation adds
    ``{stage}/bleu4`` and ``{stage}/cider`` of generated captions.

    Captions are trained after ``model.prompt``; ``generation`` sets decoding for
    evaluation and :meth:`caption`.
    """

    family = "blip"

    def __init__(
        self,
        model: BLIPConfig = BLIPConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        generation: GenerationConfig = GenerationConfig(),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    ):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        self.config, load_tower = resolved_tower(as_config(model, BLIPConfig, "model"))
        self.generation = generation
        self.model, self.tokenizer = build_blip(self.config)
        load_tower(self.model)
        record_resolved_tower(self, model, self.config)
        self.preprocess_config = self.config.vision

    @torch.no_grad()
    def generate_ids(self, pixel_values: Tensor, prompt: str | None = None,
                     config: GenerationConfig | None = None) -> Tensor:
        """(B, T) caption token ids after the prompt (default ``model.prompt``), right-padded."""
        prefix_ids = None
        if prompt is not None:
            prefix_ids = torch.tensor(prompt_prefix(self.tokenizer, prompt), device=pixel_values.device)
            prefix_ids = prefix_ids.expand(len(pixel_values), -1)
        return self.model.generate(pixel_values, prefix_ids, config or self.generation)

    def caption(self, pixel_values: Tensor, prompt: str | None = None, config: GenerationConfig | None = None
                ) -> list[str]:
        """Captions for (B, 3, H, W) images (the prompt is not repeated in the output)."""
        return [self.tokenizer.decode(row).strip() for row in self.generate_ids(pixel_values, prompt, config)]

