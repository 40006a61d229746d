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

from vlzoo.config import BLIPConfig, EvalConfig, FinetuneConfig, OptimConfig
from vlzoo.data.datamodule import EvalAnnotations
from vlzoo.data.tokenizers import Tokenizer, build_tokenizer
from vlzoo.eval.vqa import answer_every_pair, vqa_metrics
from vlzoo.losses import IGNORE, caption_lm_loss
from vlzoo.models.blip_vqa import BLIPVQA
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks.base import VLTask
from vlzoo.tasks.loading import as_config

_DECODER_LAYER = re.compile(r"^decoder\.layer\.")


def build_blip_vqa_model(cfg: BLIPConfig) -> tuple[BLIPVQA, Tokenizer, BLIPConfig]:
    """(BLIPVQA, tokenizer, the config with concrete BERT sizes) from a BLIP config."""
    from vlzoo.backbones import bert_config_from_kwargs
    from vlzoo.hub.convert.hf_blip import BlipTokenIds, build_blip_vqa

    tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.context_length, blip_tokens=True)
    info = tokenizer.info
    sizes = dataclasses.asdict(bert_config_from_kwargs(cfg.text, tokenizer))
    concrete = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained=None, kwargs=sizes))
    ids = BlipTokenIds(enc=info.enc_id, dec=info.dec_id, pad=info.pad_id, eos=info.eos_id)
    return build_blip_vqa(concrete, ids), tokenizer, concrete


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
        model = as_config(model, BLIPConfig, "model")
        self.model, self.tokenizer, self.config = build_blip_vqa_model(model)
        self.hparams["model"] = dataclasses.asdict(self.config)  # concrete sizes: no BERT directory needed later
        self.preprocess_config = model.vision
        self.generation = self.vqa_generation = generation  # vlzoo.load(...).vqa decodes with vqa_generation

    def initial_state(self, parts) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        if parts.family != "blip":
            return super().initial_state(parts)  # a BLIP VQA model as is
        state, kept = blip_to_vqa_state(parts.model.state_dict(), self.model.state_dict())
        if kept:
            print(f"vlzoo: {len(kept)} answer-decoder cross-attention tensors start random (BLIP's image width "
                  f"differs from its text width)", file=sys.stderr, flush=True)
        return state, tuple(kept)

    def _answer_batch(self, answers: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Answers -> ([DEC] answer [SEP] ids, mask, labels) each (B, L)."""
        tokens = self._tokenize(answers)
        ids = tokens["input_ids"].clone()
        ids[:, 0] = self.model.dec_id
        labels = ids.masked_fill(tokens["attention_mask"] == 0, IGNORE)
        return ids, tokens["attention_mask"], labels

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        question = self._tokenize(batch["questions"])
        ids, mask, labels = self._answer_batch(batch["answers"])
        logits = self.model.answer_logits(batch["pixel_values"], question["input_ids"], question["attention_mask"],
                                          ids, mask)
        loss = caption_lm_loss(logits, labels, self.config.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def answer_from_tokens(self, image_tokens: Tensor, questions: list[str]) -> list[str]:
        """One answer per (image tokens (B, N, Dv), question) pair."""
        question = self._tokenize(questions)
        ids = self.model.answer_from_tokens(image_tokens, question["input_ids"], question["attention_mask"],
                                            self.generation)
        return [self.tokenizer.decode(row).strip() for row in ids]

    @torch.no_grad()
    def vqa(self, pixel_values: Tensor, questions: list[str]) -> list[str]:
        """Answers to one question per image (B, 3, H, W)."""
        return self.answer_from_tokens(self.model.vision(pixel_values).tokens, questions)

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        return self.model.vision(pixel_values).pooled

    def eval_image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return {"tokens": self.model.vision(pixel_values).tokens}

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations) -> dict[str, float]:
        if not any(ann.qa):
            raise ValueError("the evaluation split has no QA pairs (records need a 'qa' field)")
        tokens = images["tokens"]

        def answer(rows: list[int], questions: list[str]) -> list[str]:
            return self.answer_from_tokens(tokens[torch.tensor(rows, device=tokens.device)], questions)

        predictions, qa = answer_every_pair(ann.qa, answer, self.eval_config.itm_batch_size)
        return vqa_metrics(predictions, qa, self.trainer.datamodule.answer_prior())
