"""ALBEF and BLIP as LightningModules: EMA + enqueue after each optimizer step,
two-stage (ITC, then ITM) retrieval evaluation, caption metrics for BLIP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.backbones import build_text_encoder, build_vision_encoder
from vlzoo.config import (
    ALBEFConfig,
    BLIPConfig,
    EvalConfig,
    FinetuneConfig,
    MomentumConfig,
    OptimConfig,
)
from vlzoo.data.datamodule import EvalAnnotations
from vlzoo.data.tokenizers import Tokenizer, build_tokenizer
from vlzoo.distributed import world_size
from vlzoo.eval.captioning import caption_metrics
from vlzoo.eval.retrieval import CaptionIndex, recall_at_k, rerank_top_k, unique_texts
from vlzoo.models.albef import ALBEF
from vlzoo.models.blip import BLIP
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks.base import VLTask


def _momentum_kwargs(cfg: MomentumConfig) -> dict:
    return dict(embed_dim=cfg.embed_dim, queue_size=cfg.queue_size, momentum=cfg.momentum,
                temperature=cfg.temperature, min_temperature=cfg.min_temperature,
                max_temperature=cfg.max_temperature)


def build_albef(cfg: ALBEFConfig) -> tuple[ALBEF, Tokenizer]:
    """(ALBEF, tokenizer) from a config; the text encoder's last ``fusion_layers`` fuse."""
    tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.context_length)
    vision = build_vision_encoder(cfg.vision, cfg.embed_dim)
    depth = _text_depth(cfg)
    text = build_text_encoder(cfg.text, cfg.embed_dim, tokenizer, vision.width,
                              range(depth - cfg.fusion_layers, depth))
    info = tokenizer.info
    if info.mask_id is None:
        raise ValueError(f"text.tokenizer {cfg.text.tokenizer!r} has no [MASK] token, which ALBEF's MLM needs")
    model = ALBEF(vision, text, cfg.fusion_layers, info.mask_id, info.special_ids, cfg.mlm_probability,
                  **_momentum_kwargs(cfg))
    return model, tokenizer


def build_blip(cfg: BLIPConfig) -> tuple[BLIP, Tokenizer]:
    """(BLIP, tokenizer) from a config; the tokenizer gains [DEC]/[ENC] when missing."""
    tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.context_length, blip_tokens=True)
    vision = build_vision_encoder(cfg.vision, cfg.embed_dim)
    text = build_text_encoder(cfg.text, cfg.embed_dim, tokenizer, vision.width, range(_text_depth(cfg)))
    info = tokenizer.info
    model = BLIP(vision, text, enc_id=info.enc_id, dec_id=info.dec_id, pad_id=info.pad_id, eos_id=info.eos_id,
                 prompt_ids=prompt_prefix(tokenizer, cfg.prompt)[1:], label_smoothing=cfg.label_smoothing,
                 **_momentum_kwargs(cfg))
    return model, tokenizer


def _text_depth(cfg: MomentumConfig) -> int:
    if cfg.text.impl != "bert":
        raise ValueError(f"text.impl must be 'bert' for ALBEF/BLIP, got {cfg.text.impl!r}")
    if cfg.text.pretrained:
        from vlzoo.backbones.text import bert_config_from_json

        return bert_config_from_json(f"{cfg.text.pretrained}/config.json").num_hidden_layers
    return int(cfg.text.kwargs.get("num_hidden_layers", 12))


def prompt_prefix(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of ``[DEC] + prompt`` (the tokenized prompt without its end token)."""
    ids = tokenizer(prompt)["input_ids"][0].tolist()
    if ids and ids[-1] == tokenizer.info.eos_id:
        ids = ids[:-1]
    return [tokenizer.info.dec_id] + ids[1:]


class TwoStageRetrievalTask(VLTask):
    """Evaluation of the families with an ITM head (ALBEF, BLIP, BLIP-2): ITC similarity
    for all pairs, the top k reranked by ITM, ITM-scored compositional accuracy.

    ``self.model`` provides ``image_tokens_and_feat``-style outputs through
    :meth:`eval_image_outputs` and ``itm_logits(ids, mask, image_tokens)``.
    """

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)

    def image_tokens_and_embeds(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> the tokens ITM reads (B, N, Dv) and the ITC embeddings."""
        return self.model.image_tokens_and_feat(pixel_values)

    def eval_image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        tokens, embeds = self.image_tokens_and_embeds(pixel_values)
        return {"embeds": embeds, "tokens": tokens}

    def _itm_scores(self, images: dict[str, Tensor], rows: Tensor, tokens: dict[str, Tensor], cols: Tensor) -> Tensor:
        """(P,) ITM match logit minus no-match logit of image rows[p] with text cols[p]."""
        logits = self.model.itm_logits(tokens["input_ids"][cols], tokens["attention_mask"][cols],
                                       images["tokens"][rows])
        return logits[:, 1] - logits[:, 0]

    def rerank_itc_weight(self) -> float:
        """What multiplies the ITC cosine in the reranked score (``eval.rerank_itc``)."""
        cfg = self.eval_config
        if cfg.rerank_itc == "logit":
            temp = self.model.temp
            temp = temp.full_tensor() if hasattr(temp, "full_tensor") else temp  # FSDP2: every rank evaluates
            return cfg.rerank_itc_weight / float(temp)
        return cfg.rerank_itc_weight * {"cosine": 1.0, "none": 0.0}[cfg.rerank_itc]

    def score_pairs(self, images: dict[str, Tensor], rows: Tensor, texts: list[str]) -> Tensor:
        size = self.eval_config.itm_batch_size
        scores = []
        for s in range(0, len(texts), size):
            tokens = self._tokenize(texts[s : s + size])
            cols = torch.arange(len(tokens["input_ids"]), device=self.device)
            scores.append(self._itm_scores(images, rows[s : s + size], tokens, cols))
        return torch.cat(scores)

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations) -> dict[str, float]:
        index = CaptionIndex.build(ann.captions)
        texts, of_text = unique_texts(index.texts)
        tokens = self._tokenize(texts)
        similarity = self.itc_similarity(images["embeds"], self.embed_texts(texts))  # (N, U) ITC
        metrics = {f"itc_{k}": v for k, v in recall_at_k(similarity[:, of_text].float().cpu(), index).items()
                   if k.startswith("r1_")}
        k, batch, weight = self.eval_config.rerank_k, self.eval_config.itm_batch_size, self.rerank_itc_weight()
        i2t = rerank_top_k(similarity, k, lambda q, c: self._itm_scores(images, q, tokens, c), batch, weight)
        t2i = rerank_top_k(similarity.T, k, lambda q, c: self._itm_scores(images, c, tokens, q), batch, weight)
        metrics.update({m: v for m, v in recall_at_k(i2t[:, of_text].cpu(), index).items() if m.endswith("i2t")})
        metrics.update({m: v for m, v in recall_at_k(t2i.T[:, of_text].cpu(), index).items() if m.endswith("t2i")})
        metrics["compositional_acc"] = self._compositional(images, ann)
        if ann.zeroshot_classes:
            metrics["zeroshot_acc"] = self._zeroshot(images["embeds"], ann)
        return metrics


class CaptionEvalMixin:
    """For captioners (BLIP, BLIP-2): evaluation captions every image from the image
    tokens already computed (``self.model.generate_from_tokens``, decoding
    ``self.generation``) and adds ``bleu4``/``cider`` against all references."""

    def eval_image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        outputs = super().eval_image_outputs(pixel_values)
        ids = self.model.generate_from_tokens(outputs["tokens"], config=self.generation)
        width = self.generation.max_length  # one width, so batches concatenate
        outputs["caption_ids"] = F.pad(ids, (0, width - ids.shape[1]), value=self.tokenizer.info.pad_id)
        return outputs

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations) -> dict[str, float]:
        metrics = super().evaluate(images, ann)
        predictions = [self.tokenizer.decode(row).strip() for row in images["caption_ids"].long()]
        metrics.update(caption_metrics(predictions, ann.captions))
        return metrics


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

    def after_optimizer_step(self) -> None:
        self.model.clamp_temperature()
        self.model.momentum_update()
        for image_feat, text_feat, index in self._pending:  # every micro-batch of this step
            self.model.enqueue(image_feat, text_feat, index)
        self._pending.clear()


class ALBEFTask(MomentumTask):
    """Trains :class:`~vlzoo.models.ALBEF` with ITC + ITM + MLM."""

    def __init__(
        self,
        model: ALBEFConfig = ALBEFConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    ):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        self.config = model
        self.model, self.tokenizer = build_albef(model)
        self.preprocess_config = model.vision


class BLIPTask(CaptionEvalMixin, MomentumTask):
    """Trains :class:`~vlzoo.models.BLIP` with ITC + ITM + LM; evaluation adds
    ``{stage}/bleu4`` and ``{stage}/cider`` of generated captions.

    Captions are trained after ``model.prompt``; ``generation`` sets decoding for
    evaluation and :meth:`caption`.
    """

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
        self.config = model
        self.generation = generation
        self.model, self.tokenizer = build_blip(model)
        self.preprocess_config = model.vision

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

