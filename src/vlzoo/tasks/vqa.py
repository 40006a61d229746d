"""BLIP visual question answering as answer generation (Li et al., 2022, section 5.3):
the image-grounded encoder reads the question, a causal answer decoder writes the
answer. Started from a BLIP (question encoder <- its image-grounded encoder, answer
decoder <- its image-grounded decoder) or from a BLIP VQA checkpoint."""

from __future__ import annotations

import dataclasses
import re
import sys

import torch
from torch import Tensor

from vlzoo.config import BLIPConfig, EvalConfig, FinetuneConfig, OptimConfig, as_config
from vlzoo.eval.evaluator import VQAEvaluator
from vlzoo.losses import IGNORE, caption_lm_loss
from vlzoo.models.blip import BLIP
from vlzoo.models.builders import build_blip_vqa_model
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks.base import VLTask, resolved_tower

_DECODER_LAYER = re.compile(r"^decoder\.layer\.")


def blip_to_vqa_state(blip_state: dict[str, Tensor], vqa_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A BLIP state dict mapped onto BLIPVQA keys: vision, question encoder (= BLIP's
    text encoder) and LM head as they are; the answer decoder from BLIP's text
    embeddings and decoder blocks. Returns (state, keys left as initialised): the
    decoder's cross-attention keys/values when BLIP's image width differs from the
    text width (BLIP's decoder reads image tokens, the answer decoder question states)."""
    state, kept = {}, []
    for key, value in blip_state.items():
        if key.startswith(("vision.", "text.", "lm_head.")):
            state[key] = value
        if key.startswith("text.embeddings."):
            state["answer_decoder." + key.removeprefix("text.")] = value
        elif _DECODER_LAYER.match(key):
            target = "answer_decoder.encoder." + key.removeprefix("decoder.")
            if vqa_state[target].shape == value.shape:
                state[target] = value
            else:
                kept.append(target)
    return {k: v for k, v in state.items() if k in vqa_state}, kept


class BLIPVQATask(VLTask):
    """Trains :class:`~vlzoo.models.blip_vqa.BLIPVQA` on one QA pair per image (LM loss
    of the answer after [DEC]); evaluation answers every QA pair of the split
    (``generation``) and reports ``{stage}/vqa_acc`` and ``{stage}/vqa_majority_acc``."""

    family = "blip_vqa"
    training_methods = ("answer_logits",)

    monitor = "val/vqa_acc"
    uses_qa = needs_qa = True

    def __init__(
        self,
        model: BLIPConfig = BLIPConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
        finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
        generation: GenerationConfig = GenerationConfig(method="greedy", max_length=8, min_length=1),  # noqa: B008
    ):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        model, load_tower = resolved_tower(as_config(model, BLIPConfig, "model"))
        self.model, self.tokenizer, self.config = build_blip_vqa_model(model)
        load_tower(self.model)
        self.hparams["model"] = dataclasses.asdict(self.config)  # concrete sizes: no BERT directory needed later
        self.preprocess_config = model.vision
        self.generation = self.vqa_generation = generation  # vlzoo.load(...).vqa decodes with vqa_generation

    def initial_state(self, parts) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        if not isinstance(parts.model, BLIP):
            return super().initial_state(parts)  # a BLIP VQA model as is
        state, kept = blip_to_vqa_state(parts.model.state_dict(), self.model.state_dict())
        if kept:
            print(f"vlzoo: {len(kept)} answer-decoder cross-attention tensors start random (BLIP's image width "
                  f"differs from its text width)", file=sys.stderr, flush=True)
        return state, tuple(kept)

    def _answer_batch(self, answers: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Answers -> ([DEC] answer [SEP] ids, mask, labels) each (B, L)."""
        tokens = self.tokenize(answers)
        ids = tokens["input_ids"].clone()
        ids[:, 0] = self.model.dec_id
        labels = ids.masked_fill(tokens["attention_mask"] == 0, IGNORE)
        return ids, tokens["attention_mask"], labels

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        question = self.tokenize(batch["questions"])
        ids, mask, labels = self._answer_batch(batch["answers"])
        logits = self.model.answer_logits(batch["pixel_values"], question["input_ids"], question["attention_mask"],
                                          ids, mask)
        loss = caption_lm_loss(logits, labels, self.config.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def answer_from_tokens(self, image_tokens: Tensor, questions: list[str]) -> list[str]:
        """One answer per (image tokens (B, N, Dv), question) pair."""
        question = self.tokenize(questions)
        ids = self.model.answer_from_tokens(image_tokens, question["input_ids"], question["attention_mask"],
                                            self.generation)
        return [self.tokenizer.decode(row).strip() for row in ids]

    @torch.no_grad()
    def vqa(self, pixel_values: Tensor, questions: list[str]) -> list[str]:
        """Answers to one question per image (B, 3, H, W)."""
        return self.answer_from_tokens(self.model.vision(pixel_values).tokens, questions)

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return self.model.vision(pixel_values).pooled

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv) image tokens the question encoder reads."""
        return self.model.vision(pixel_values).tokens

    def make_evaluator(self) -> VQAEvaluator:
        return VQAEvaluator(self, self.eval_config)
