"""The pretrained zoo from Python: ``vlzoo.list_models``, ``vlzoo.create_model``,
``vlzoo.load``, and :class:`ZooModel`, the one interface every loaded model has.

``vlzoo.load(ref)`` accepts a manifest name (``clip-vit-b32-openai``), a vlzoo
checkpoint (a ``vlzoo fit`` ``.ckpt``, a run directory, or a ``vlzoo export``
directory), a local Hugging Face directory (``config.json`` with model_type ``clip``,
``blip`` or ``blip-2``), a local open_clip hub directory (``open_clip_config.json``),
or ``hf://org/repo`` (fetched through huggingface_hub).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlzoo import families
from vlzoo.config import VisionConfig
from vlzoo.hub.convert import LoadedParts
from vlzoo.hub.generation import ANSWER_DEFAULTS, CAPTION_DEFAULTS, generation_config
from vlzoo.hub.loaders import load_parts, parts_from_zoo_config
from vlzoo.hub.manifest import config_path, list_models, load_manifest
from vlzoo.models.blip2 import max_query_similarity

__all__ = ["ZooModel", "create_model", "list_models", "load"]


class CapabilityError(NotImplementedError):
    """The loaded model's family (or checkpoint) cannot do what was asked."""


RESIZE_MODES = ("shortest", "squash")


def build_preprocess(cfg: VisionConfig):
    """PIL image -> (3, S, S) float tensor: RGB; ``resize_mode`` ``shortest`` resizes the
    shorter side to S and centre-crops (CLIP, open_clip), ``squash`` resizes to S x S
    (BLIP's and ALBEF's pipelines, transformers' BlipImageProcessor); the config's
    interpolation; scaled to [0, 1] and normalised with mean/std."""
    from torchvision.transforms import v2

    mode = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}[cfg.interpolation]
    size = cfg.image_size
    if cfg.resize_mode not in RESIZE_MODES:
        raise ValueError(f"vision.resize_mode must be one of {RESIZE_MODES}, got {cfg.resize_mode!r}")
    resize = ([v2.Resize((size, size), interpolation=mode, antialias=True)] if cfg.resize_mode == "squash"
              else [v2.Resize(size, interpolation=mode, antialias=True), v2.CenterCrop(size)])
    transform = v2.Compose([
        v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std)),
    ])

    def preprocess(image) -> Tensor:
        return transform(image.convert("RGB") if hasattr(image, "convert") else image)

    return preprocess


def embedding_similarity(image: Tensor, text: Tensor) -> Tensor:
    """(N, D) or BLIP-2's (N, Q, D) image embeddings and (T, D) text embeddings ->
    (N, T) cosine similarity (BLIP-2: the maximum over the queries, as its ITC)."""
    if image.ndim == 3:
        return max_query_similarity(image, text)
    return image @ text.t()


class ZooModel(nn.Module):
    """A loaded model with its preprocessing and tokenizer, and the methods its family can do.

    Attributes: ``model`` (the vlzoo ``nn.Module``), ``family``, ``capabilities``,
    ``config`` (the vlzoo model config), ``preprocess`` (PIL -> (3, S, S) tensor),
    ``tokenizer`` (texts -> ``input_ids``/``attention_mask``), ``source``.
    """

    def __init__(self, parts: LoadedParts):
        super().__init__()
        families.get(parts.family)  # a registered family, or an error naming the known ones
        self.model = parts.model
        self.family, self.capabilities, self.config = parts.family, parts.capabilities, parts.config
        self.preprocess_config = parts.preprocess
        self.preprocess = build_preprocess(parts.preprocess)
        self.tokenizer = parts.tokenizer
        self.source = parts.source
        self.extra = parts.extra
        self.eval()

    def __repr__(self) -> str:
        return f"ZooModel(family={self.family!r}, capabilities={sorted(self.capabilities)}, source={self.source!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _require(self, capability: str, what: str) -> None:
        if capability not in self.capabilities:
            raise CapabilityError(f"{self.source or self.family}: a {self.family} model loaded from this checkpoint "
                                  f"cannot {what} (it can: {', '.join(sorted(self.capabilities)) or 'nothing'})")

    def _require_decoder_tokenizer(self) -> None:
        tokenizer = self.extra["llm_tokenizer"] if "llm_tokenizer" in self.extra else self.tokenizer  # BLIP-2 stage 2
        if tokenizer is None:
            raise ValueError(f"{self.source or self.family}: loaded without a tokenizer, so generated ids cannot be "
                             "decoded to text (put the tokenizer files in the model directory)")

    # ----------------------------------------------------------------- inputs
    def pixel_values(self, images) -> Tensor:
        """A (B, 3, S, S) tensor as is, or PIL images (one or a list) preprocessed."""
        if isinstance(images, Tensor):
            return images.to(self.device)
        images = images if isinstance(images, Sequence) else [images]
        return torch.stack([self.preprocess(im) for im in images]).to(self.device)

    def tokenize(self, texts: str | Sequence[str] | Tensor, attention_mask: Tensor | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """(input_ids, attention_mask), each (B, L), from strings; ids pass through with
        their mask (None when not given)."""
        if isinstance(texts, Tensor):  # no mask: the encoder's own default (open_clip: the argmax/EOT token)
            return texts.to(self.device), None if attention_mask is None else attention_mask.to(self.device)
        if self.tokenizer is None:
            raise ValueError(f"{self.source or self.family}: this model was loaded without a tokenizer; pass "
                             "token ids (B, L) instead of strings")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        batch = self.tokenizer(texts)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    # ---------------------------------------------------------------- methods
    @torch.no_grad()
    def encode_image(self, pixel_values) -> Tensor:
        """Images -> (B, D) normalised embeddings; BLIP-2: (B, Q, D), one per query."""
        self._require("encode", "embed images")
        return self.model.encode_image(self.pixel_values(pixel_values))

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str] | Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Texts (strings or (B, L) ids) -> (B, D) normalised embeddings."""
        self._require("encode", "embed texts")
        return self.model.encode_text(*self.tokenize(texts, attention_mask))

    @torch.no_grad()
    def similarity(self, images, texts) -> Tensor:
        """(N_images, N_texts) cosine similarity of the contrastive embeddings; BLIP-2:
        the maximum over its queries, as its ITC."""
        return embedding_similarity(self.encode_image(images), self.encode_text(texts))

    @torch.no_grad()
    def itm_score(self, pixel_values, input_ids: str | Sequence[str] | Tensor,
                  attention_mask: Tensor | None = None) -> Tensor:
        """(B,) probability that image i and text i match (ALBEF, BLIP, BLIP-2)."""
        self._require("itm", "score image-text matches")
        return self.model.itm_score(self.pixel_values(pixel_values), *self.tokenize(input_ids, attention_mask))

    @torch.no_grad()
    def generate(self, pixel_values, prompt: str | None = None, **kwargs: Any) -> list[str]:
        """Captions (or text after ``prompt``) for images; ``kwargs`` are
        :class:`~vlzoo.models.generation.GenerationConfig` fields (method, num_beams,
        max_length, min_length, top_p, ...)."""
        self._require("generate", "generate text")
        self._require_decoder_tokenizer()
        caption = families.get(self.family).caption
        if caption is None:
            raise CapabilityError(f"no text generation for family {self.family!r}")
        config = generation_config(self.extra, "generation", CAPTION_DEFAULTS, kwargs)
        return caption(self, self.pixel_values(pixel_values), prompt, config)

    @torch.no_grad()
    def vqa(self, pixel_values, questions: str | Sequence[str], **kwargs: Any) -> list[str]:
        """One answer per (image, question) pair."""
        self._require("vqa", "answer questions")
        self._require_decoder_tokenizer()
        answer = families.get(self.family).answer
        if answer is None:
            raise CapabilityError(f"no question answering for family {self.family!r}")
        questions = [questions] if isinstance(questions, str) else list(questions)
        pixel_values = self.pixel_values(pixel_values)
        if len(questions) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(questions)} questions (one question per image)")
        config = generation_config(self.extra, "vqa_generation", ANSWER_DEFAULTS, kwargs)
        return answer(self, pixel_values, questions, config)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


# ------------------------------------------------------------------- the API
def create_model(name_or_config: str | Path, pretrained: bool = False) -> ZooModel:
    """A model from a manifest name or a zoo config YAML; ``pretrained`` loads the
    manifest's weights (as :func:`load`), otherwise the architecture is randomly
    initialised from the entry's zoo config."""
    ref = str(name_or_config)
    entries = load_manifest()
    family = None
    if ref in entries:
        if pretrained:
            return load(ref)
        path, family = config_path(entries[ref]), entries[ref].family
    else:
        if pretrained:
            raise ValueError(f"{ref}: pretrained=True needs a manifest name (see vlzoo.list_models())")
        path = Path(ref)
    parts = parts_from_zoo_config(path, family)
    if family is not None and parts.family != family:
        raise ValueError(f"{ref}: the manifest says family {family!r}, its config {path} builds {parts.family!r}")
    return ZooModel(parts)


def load(ref: str | Path, device: str | torch.device | None = None) -> ZooModel:
    """A pretrained model in eval mode, with ``.preprocess`` and ``.tokenizer``. See the
    module docstring for what ``ref`` may be."""
    model = ZooModel(load_parts(ref))
    return model.to(device) if device is not None else model
