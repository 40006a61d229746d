"""BLIP-2 stage 1 as a LightningModule: ITC + ITM + ITG on a frozen image encoder,
with an optional cache of the frozen encoder's outputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from vlzoo.artefacts import artefact_checkpoint, artefact_hf_dir
from vlzoo.backbones import build_vision_encoder
from vlzoo.checkpoints import read_checkpoint
from vlzoo.config import (
    BLIP2Config,
    BLIP2LLMConfig,
    EvalConfig,
    FinetuneConfig,
    OptimConfig,
    VisionConfig,
    as_config,
)
from vlzoo.data.llm_text import causal_lm_batch, load_lm_tokenizer, seq2seq_batch
from vlzoo.data.tokenizers import Tokenizer, build_tokenizer
from vlzoo.eval.evaluator import PromptedLLMEvaluator
from vlzoo.models.blip2 import (
    BLIP2,
    BLIP2LLM,
    FROZEN_DTYPES,
    LLM_KINDS,
    llm_answer,
    max_query_similarity,
)
from vlzoo.models.builders import build_blip2, build_qformer, concrete_text_config
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks.base import VLTask, resolved_tower
from vlzoo.tasks.momentum import CaptionEvalMixin, TwoStageRetrievalTask
from vlzoo.weights import load_strict


def build_resolved_blip2(cfg: BLIP2Config) -> tuple[BLIP2, Tokenizer, VisionConfig]:
    """(BLIP2, tokenizer, the frozen tower's concrete vision config): the vision reference
    resolved first (a ``zoo:`` tower trained and cached when missing), then built."""
    cfg, load_tower = resolved_tower(cfg)
    model, tokenizer = build_blip2(cfg)
    load_tower(model)
    return model, tokenizer, cfg.vision


class FrozenFeatureCache:
    """The frozen encoder's output (N, Dv) per training sample id, kept in host memory;
    only correct when an image is preprocessed the same way every epoch."""

    def __init__(self) -> None:
        self.features: dict[int, Tensor] = {}
        self.hits = self.misses = 0

    def get(self, index: Tensor | list[int], pixel_values: Tensor, encode) -> Tensor:
        """(B,) ids, (B, 3, H, W) images -> (B, N, Dv), encoding only the ids not cached.
        Give the ids as a host list (:attr:`HOST_IDS` of the batch) to read nothing back
        from the device; only a batch with a miss then waits for its encoding."""
        ids = index if isinstance(index, list) else index.tolist()
        missing = [i for i, sample in enumerate(ids) if sample not in self.features]
        if missing:
            encoded = encode(pixel_values[missing]).cpu()
            for row, i in enumerate(missing):
                self.features[ids[i]] = encoded[row]
        self.misses += len(missing)
        self.hits += len(ids) - len(missing)
        return torch.stack([self.features[i] for i in ids]).to(pixel_values.device, non_blocking=True)

    HOST_IDS = "index_ids"
    """The batch key of the sample ids as a host list, taken before the batch moves to the device."""


class FrozenFeaturesMixin:
    """Frozen image-encoder outputs of a training batch, through a
    :class:`FrozenFeatureCache` when ``self.feature_cache`` is set."""

    feature_cache: FrozenFeatureCache | None = None
    fsdp_keep_fp32 = True  # FSDP param_dtype leaves the Q-Former in fp32 (fp16 Q-Formers overflow)

    def on_fit_start(self) -> None:
        if self.feature_cache is not None and getattr(self.trainer.datamodule, "random_augmentation", False):
            raise ValueError("model.cache_image_features needs deterministic preprocessing; "
                             "the data module applies random augmentation")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With the cache: the sample ids as a host list too, so a step looks them up
        without reading the device."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.feature_cache is not None and isinstance(batch, dict) and "index" in batch:
            batch[FrozenFeatureCache.HOST_IDS] = batch["index"].tolist()
        return batch

    def frozen_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, N, Dv) frozen encoder outputs of the batch, from the cache when enabled."""
        if self.feature_cache is None:
            return self.model.frozen_encoder_tokens(batch["pixel_values"])
        ids = batch.get(FrozenFeatureCache.HOST_IDS, batch["index"])
        return self.feature_cache.get(ids, batch["pixel_values"], self.model.frozen_encoder_tokens)


class BLIP2Task(FrozenFeaturesMixin, CaptionEvalMixin, TwoStageRetrievalTask):
    """Trains BLIP-2 stage 1; evaluation: two-stage retrieval (ITC max over queries,
    ITM rerank), compositional accuracy, zero-shot, and Q-Former-only captions
    (``bleu4``, ``cider``)."""

    family = "blip2"
    training_methods = ("forward_frozen",)

    def __init__(
        self,
        model: BLIP2Config = BLIP2Config(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        generation: GenerationConfig = GenerationConfig(),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    ):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        model = as_config(model, BLIP2Config, "model")
        self.generation = generation
        self.model, self.tokenizer, self.preprocess_config = build_resolved_blip2(model)
        self.config = dataclasses.replace(model, vision=self.preprocess_config)  # the concrete tower
        # the checkpoint records the concrete tower and Q-Former (weights in the state dict), not references
        self.hparams["model"] = dataclasses.asdict(dataclasses.replace(
            model, vision=self.preprocess_config, qformer=concrete_text_config(model.qformer, self.model.qformer)))
        self.feature_cache = FrozenFeatureCache() if model.cache_image_features else None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model.forward_frozen(self.frozen_tokens(batch), batch["input_ids"], batch["attention_mask"],
                                        batch["index"])
        loss = self.total_loss(out.losses)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in out.losses.items()})
        self.log("train/temperature", self.model.temp.detach())
        return loss

    def after_optimizer_step(self, applied: Tensor | None = None) -> None:  # a skipped step: clamping changes nothing
        self.model.clamp_temperature()

    @torch.no_grad()
    def caption(self, pixel_values: Tensor, config: GenerationConfig | None = None) -> list[str]:
        """Q-Former-only captions of (B, 3, H, W) images (decoding ``generation``)."""
        ids = self.model.generate(pixel_values, config or self.generation)
        return [self.tokenizer.decode(row).strip() for row in ids]

    # ---------------------------------------------------------------- evaluation
    def image_tokens_and_embeds(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """-> image tokens after ``ln_vision`` (B, N, Dv) and query embeddings (B, Q, E)."""
        tokens = self.model.image_tokens(pixel_values)
        return tokens, self.model.query_features(tokens)

    def itc_similarity(self, image_embeds: Tensor, text_embeds: Tensor, chunk: int = 64) -> Tensor:
        """(N, Q, E), (T, E) -> (N, T) max over queries, in chunks of images (bounded memory)."""
        parts = [max_query_similarity(image_embeds[i : i + chunk], text_embeds)
                 for i in range(0, len(image_embeds), chunk)]
        return torch.cat(parts)


# ----------------------------------------------------------------------------- stage 2


def load_llm(reference: str, kind: str | None = None, precision: str | None = None):
    """(model, tokenizer, kind) of a Hugging Face LLM: a hub name, a local directory or
    ``zoo:lm/...``; ``kind`` ``causal`` or ``seq2seq`` (None: from its config)."""
    from transformers import (  # heavy: stage 2 only
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
    )

    source = str(artefact_hf_dir(reference))
    config = AutoConfig.from_pretrained(source)
    kind = kind or ("seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal")
    if kind not in LLM_KINDS:
        raise ValueError(f"llm_kind must be one of {LLM_KINDS}, got {kind!r}")
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    dtype = FROZEN_DTYPES.get(precision) or torch.float32
    return auto.from_pretrained(source, dtype=dtype), load_lm_tokenizer(source), kind


def stage1_parts(reference: str) -> tuple[BLIP2Config, dict[str, Tensor]]:
    """The config and weights of a stage-1 checkpoint (``zoo:`` or a path)."""
    path = artefact_checkpoint(reference)
    checkpoint = read_checkpoint(path)
    model_config = checkpoint.get("hyper_parameters", {}).get("model")
    if not isinstance(model_config, BLIP2Config | dict) or not any(k.startswith("model.qformer.")
                                                                    for k in checkpoint["state_dict"]):
        raise ValueError(f"stage1 {reference}: {path} is not a BLIP-2 stage-1 checkpoint "
                         f"(written by {checkpoint.get('vlzoo_task')})")
    try:
        stage1 = as_config(model_config, BLIP2Config, f"{path}: model")
    except ValueError as err:
        raise ValueError(f"stage1 {reference}: {path} is not a BLIP-2 stage-1 checkpoint "
                         f"(written by {checkpoint.get('vlzoo_task')}): {err}") from None
    return stage1, checkpoint["state_dict"]


def build_blip2_llm(cfg: BLIP2LLMConfig):
    """(BLIP2LLM, Q-Former tokenizer, LLM tokenizer, concrete config) from a config; with
    ``stage1`` the frozen encoder, ``ln_vision`` and Q-Former come from that checkpoint."""
    state = None
    if cfg.stage1:
        stage1, state = stage1_parts(cfg.stage1)
        cfg = dataclasses.replace(cfg, stage1=None, vision=stage1.vision, qformer=stage1.qformer,
                                  num_queries=stage1.num_queries, cross_attention_every=stage1.cross_attention_every)
    tokenizer = build_tokenizer(cfg.qformer.tokenizer, cfg.qformer.context_length, blip_tokens=True)
    cfg, load_tower = resolved_tower(cfg)
    vision = build_vision_encoder(cfg.vision, 1)  # no projection of its own is used
    qformer = build_qformer(cfg, tokenizer, vision.width)
    llm, llm_tokenizer, kind = load_llm(cfg.llm, cfg.llm_kind, cfg.llm_precision)
    model = BLIP2LLM(vision, qformer, llm, cfg.frozen_precision, cfg.llm_precision)
    load_tower(model)
    if state is not None:
        for part in ("vision", "ln_vision", "qformer"):
            prefix = f"model.{part}."
            load_strict(getattr(model, part), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                        source=f"stage1 {part}")
    concrete = dataclasses.replace(cfg, qformer=concrete_text_config(cfg.qformer, qformer),
                                   llm_kind=kind)
    return model, tokenizer, llm_tokenizer, concrete


class BLIP2LLMTask(FrozenFeaturesMixin, VLTask):
    """Trains BLIP-2 stage 2: LM loss of each image's caption after ``caption_prompt``
    and (``train_vqa``) of one answer after ``vqa_prompt``, through the frozen LLM.
    Evaluation: ``bleu4``/``cider`` of generated captions, ``vqa_acc`` on every QA pair
    of the split and ``vqa_majority_acc`` of the majority-answer baseline."""

    family = "blip2_llm"

    monitor = "val/cider"

    def __init__(
        self,
        model: BLIP2LLMConfig = BLIP2LLMConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        generation: GenerationConfig = GenerationConfig(),  # noqa: B008
        vqa_generation: GenerationConfig = GenerationConfig(method="greedy", max_length=5, min_length=1),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    ):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        model = as_config(model, BLIP2LLMConfig, "model")
        self.model, self.tokenizer, self.llm_tokenizer, concrete = build_blip2_llm(model)
        if not model.instruction_aware:  # the Q-Former reads queries alone: its text-only weights take no gradient
            for p in self.model.qformer.text_only_parameters():
                p.requires_grad_(False)
        self.config = concrete
        # references resolved: a checkpoint does not need the stage-1 artefact
        self.hparams["model"] = dataclasses.asdict(concrete)
        self.preprocess_config = concrete.vision
        self.generation, self.vqa_generation = generation, vqa_generation
        self.uses_qa = model.train_vqa
        self.feature_cache = FrozenFeatureCache() if model.cache_image_features else None

    # ------------------------------------------------------------------ text
    def _text_batch(self, prompts: list[str], targets: list[str]) -> dict[str, Tensor]:
        build = seq2seq_batch if self.model.is_encoder_decoder else causal_lm_batch
        batch = build(self.llm_tokenizer, prompts, targets, self.config.max_text_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _soft_prompt(self, image_tokens: Tensor) -> Tensor:
        """(B, N, Dv) image tokens -> (B, Q, H) soft prompt (no instruction)."""
        return self.model.soft_prompt(image_tokens)

    def _question_soft_prompt(self, image_tokens: Tensor, questions: list[str], soft: Tensor | None = None) -> Tensor:
        """The soft prompt for questions: read with the question when ``instruction_aware``,
        otherwise the plain one (``soft`` when already computed for these images)."""
        if not self.config.instruction_aware:
            return self._soft_prompt(image_tokens) if soft is None else soft
        instruction = self.tokenize(questions)
        return self.model.soft_prompt(image_tokens, instruction["input_ids"], instruction["attention_mask"])

    def _vqa_prompts(self, questions: list[str]) -> list[str]:
        return [self.config.vqa_prompt.format(q) for q in questions]

    # -------------------------------------------------------------- training
    def losses(self, batch: dict) -> dict[str, Tensor]:
        """``caption`` (and ``vqa``) LM losses of a training batch."""
        captions = batch["captions"]
        caption = self._text_batch([self.config.caption_prompt] * len(captions), captions)
        vqa = instruction = None
        if self.config.train_vqa and "questions" in batch:
            vqa = self._text_batch(self._vqa_prompts(batch["questions"]), batch["answers"])
            if self.config.instruction_aware:
                instruction = self.tokenize(batch["questions"])
        return self.model(self.frozen_tokens(batch), caption, vqa, instruction)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        loss = self.total_loss(losses)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in losses.items()})
        return loss

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def answer(self, soft: Tensor, prompts: list[str], config: GenerationConfig | None = None) -> list[str]:
        """Generated text after a soft prompt (B, Q, H) and each text prompt."""
        return llm_answer(self.model, self.llm_tokenizer, soft, prompts, config or self.generation,
                          self.config.max_text_length)

    @torch.no_grad()
    def caption(self, pixel_values: Tensor, prompt: str | None = None) -> list[str]:
        """Captions of (B, 3, H, W) images after ``prompt`` (default ``caption_prompt``)."""
        prompt = self.config.caption_prompt if prompt is None else prompt
        return self.answer(self._soft_prompt(self.model.image_tokens(pixel_values)), [prompt] * len(pixel_values))

    @torch.no_grad()
    def vqa(self, pixel_values: Tensor, questions: list[str]) -> list[str]:
        """Answers to one question per image."""
        soft = self._question_soft_prompt(self.model.image_tokens(pixel_values), questions)
        return self.answer(soft, self._vqa_prompts(questions), self.vqa_generation)

    # ------------------------------------------------------------ evaluation
    def make_evaluator(self) -> PromptedLLMEvaluator:
        return PromptedLLMEvaluator(self, self.eval_config)

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv) frozen encoder tokens after ``ln_vision``."""
        return self.model.image_tokens(pixel_values)

    def soft_prompt(self, image_tokens: Tensor) -> Tensor:
        return self._soft_prompt(image_tokens)

    def caption_from_soft(self, soft: Tensor) -> list[str]:
        """Captions after ``caption_prompt`` from (B, Q, H) soft prompts."""
        return self.answer(soft, [self.config.caption_prompt] * len(soft))

    def answer_from_soft(self, image_tokens: Tensor, soft: Tensor, questions: list[str]) -> list[str]:
        """Answers to one question per image (its tokens and plain soft prompt given)."""
        question_soft = self._question_soft_prompt(image_tokens, questions, soft)
        return self.answer(question_soft, self._vqa_prompts(questions), self.vqa_generation)

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.config.checkpoint_llm:  # the frozen LLM is reloaded from config.llm
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("model.llm.") or "lora_" in k}  # adapters train

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        if not any(k.startswith("model.llm.") and "lora_" not in k for k in state):
            state.update({f"model.llm.{k}": v for k, v in self.model.llm.state_dict().items()
                          if f"model.llm.{k}" not in state})
