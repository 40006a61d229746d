"""A small causal language model trained on the training text: the frozen LM of the
shapes BLIP-2 (``zoo_configs/models/lm/shapes-tiny.yaml``), exported in Hugging Face
form so that stage 2 loads it like any other LLM."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vlzoo.config import CausalLMConfig, EvalConfig, OptimConfig, VisionConfig
from vlzoo.data.llm_text import causal_lm_batch, load_lm_tokenizer
from vlzoo.data.resumable import draw
from vlzoo.data.tokenizers import build_tokenizer
from vlzoo.distributed import gather_objects
from vlzoo.tasks.base import VLTask


def build_causal_lm(cfg: CausalLMConfig, tokenizer):
    """A randomly initialised ``AutoModelForCausalLM`` of ``cfg.architecture`` sized by
    ``cfg.kwargs``, with the tokenizer's vocabulary and special ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(cfg.architecture, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **cfg.kwargs)
    return AutoModelForCausalLM.from_config(config)


class CausalLMTask(VLTask):
    """Trains a causal LM on each training image's caption and one QA pair
    (``Question: ... Answer: ...``), and with ``caption_context`` on the caption after
    another caption of its image; validation reports ``val/loss`` and ``val/perplexity``
    over all captions and QA pairs of the split (and each caption after the image's first)."""

    monitor = "val/loss"
    uses_qa = True

    def __init__(
        self,
        model: CausalLMConfig = CausalLMConfig(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        eval: EvalConfig = EvalConfig(),  # noqa: B008
    ):
        super().__init__(optim, eval)
        self.save_hyperparameters()
        self.config = model
        self.lm_tokenizer = load_lm_tokenizer(model.tokenizer, model.add_bos)
        self.model = build_causal_lm(model, self.lm_tokenizer)
        self.tokenizer = build_tokenizer(model.tokenizer, model.max_text_length)  # the data module's collator
        self.preprocess_config = VisionConfig(image_size=64)  # images are not used
        self._eval_sums: list[tuple[float, int]] = []

    def texts_loss(self, prompts: list[str], targets: list[str]) -> tuple[Tensor, int]:
        """Mean LM loss of the targets after their prompts, and the number of target tokens."""
        batch = causal_lm_batch(self.lm_tokenizer, prompts, targets, self.config.max_text_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        return self.model(**batch).loss, tokens

    def _prompts_and_targets(self, captions: list[str], qa: list[dict[str, str]], contexts: list[str]
                             ) -> tuple[list[str], list[str]]:
        """Captions alone, then each QA pair after its image's caption (``qa_context``)."""
        questions = [self.config.vqa_prompt.format(q["question"]) for q in qa]
        if self.config.qa_context:
            questions = [f"{c.strip()} {q}" for c, q in zip(contexts, questions, strict=True)]
        return [""] * len(captions) + questions, list(captions) + [q["answer"] for q in qa]

    def _context_captions(self, index: list[int], captions: list[str]) -> tuple[list[str], list[str]]:
        """For each training caption, another caption of the same image (drawn per step and
        image, so a resumed run draws the same); images with one distinct caption are left out."""
        source = self.trainer.datamodule.source("train")
        records = getattr(source, "records", None)
        if records is None:
            raise ValueError(f"model.caption_context needs the other captions of each training image: data.train "
                             f"({source.name}) is streamed; use a source with records (JSONL, CSV, shapes) or "
                             "caption_context: false")
        contexts, targets = [], []
        for image, caption in zip(index, captions, strict=True):
            others = sorted({c for c in records[image]["captions"] if c != caption})
            if others:
                contexts.append(others[draw(self.global_step, 0, image, len(others), salt=2)])
                targets.append(caption)
        return contexts, targets

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        qa = [{"question": q, "answer": a} for q, a in zip(batch.get("questions", []), batch.get("answers", []),
                                                            strict=True)]
        prompts, targets = self._prompts_and_targets(batch["captions"], qa, batch["captions"][: len(qa)])
        if self.config.caption_context:
            contexts, captions = self._context_captions(batch["index"].tolist(), batch["captions"])
            prompts, targets = prompts + contexts, targets + captions
        loss, _ = self.texts_loss(prompts, targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ---------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stage = "test" if self.trainer.testing else "val"
        ann = self.trainer.datamodule.annotations(stage)
        rows = batch["index"].tolist()
        captions = [c for i in rows for c in ann.captions[i]]
        pairs = [(ann.captions[i][0], q) for i in rows for q in (ann.qa[i] if ann.qa else [])]
        prompts, targets = self._prompts_and_targets(captions, [q for _, q in pairs], [c for c, _ in pairs])
        if self.config.caption_context:  # every other caption of an image after its first
            follow = [(ann.captions[i][0], c) for i in rows for c in ann.captions[i][1:]]
            prompts, targets = prompts + [c for c, _ in follow], targets + [t for _, t in follow]
        loss, tokens = self.texts_loss(prompts, targets)
        self._eval_sums.append((float(loss) * tokens, tokens))

    def _finish_eval(self, stage: str) -> None:
        sums = [s for part in gather_objects(self._eval_sums) for s in part]
        self._eval_sums = []
        if self.trainer.sanity_checking or not sums:
            return
        loss = sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))
        self.log_dict({f"{stage}/loss": loss, f"{stage}/perplexity": float(torch.tensor(loss).exp())})

    @torch.no_grad()
    def export_pretrained(self, directory: str | Path) -> None:
        """Write the LM and its tokenizer in Hugging Face form (``from_pretrained``-able)."""
        self.model.save_pretrained(directory)
        self.lm_tokenizer.save_pretrained(directory)
