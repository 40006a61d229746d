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

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vlzoo import families
from vlzoo.data.images import load_image
from vlzoo.data.pipelines import ImagePipeline, build_image_transform
from vlzoo.hub.convert import LoadedParts
from vlzoo.hub.generation import ANSWER_DEFAULTS, CAPTION_DEFAULTS, generation_config
from vlzoo.hub.loaders import load_parts, parts_from_zoo_config
from vlzoo.hub.manifest import config_path, list_models, load_manifest
from vlzoo.models.blip2 import max_query_similarity

__all__ = ["ZooModel", "create_model", "list_models", "load"]


class CapabilityError(NotImplementedError):
    """The loaded model's family (or checkpoint) cannot do what was asked."""


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

    def __init__(self, parts: LoadedParts, image_conversion: str = "reference", exif_transpose: bool | None = None):
        super().__init__()
        families.get(parts.family)  # a registered family, or an error naming the known ones
        self.model = parts.model
        self.family, self.capabilities, self.config = parts.family, parts.capabilities, parts.config
        self.preprocess_config = parts.preprocess
        self.pipeline = parts.pipeline or ImagePipeline()
        self.set_image_options(image_conversion, exif_transpose)
        self.tokenizer = parts.tokenizer
        if self.tokenizer is not None and self.pipeline.kind == "open_clip":
            self.tokenizer.pad_to_context = True  # open_clip's tokenizer pads to its context length
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
    def set_image_options(self, image_conversion: str = "reference", exif_transpose: bool | None = None) -> None:
        """``image_conversion``: ``reference`` (the release's own colour conversion) or ``vlzoo``
        (:func:`vlzoo.data.images.to_rgb` first: palette expanded before resizing, alpha onto
        white, 16-bit scaled); ``exif_transpose``: rotate image files by their EXIF orientation
        (None: as the pipeline's reference: the foreign references do not, vlzoo's own
        readers do)."""
        self.preprocess = build_image_transform(self.pipeline, self.preprocess_config, image_conversion)
        self.image_conversion = image_conversion
        self.exif_transpose = self.pipeline.kind == "vlzoo" if exif_transpose is None else exif_transpose

    def pixel_values(self, images) -> Tensor:
        """A (B, 3, S, S) float tensor as is (moved to the model's device and input dtype), or
        images preprocessed by the checkpoint's own pipeline: one or a sequence of PIL images,
        file paths, encoded bytes, (H, W[, C]) uint8 arrays or (C, H, W) uint8 tensors."""
        if isinstance(images, Tensor) and images.dim() == 4:
            return images.to(self.device, self.input_dtype)
        one = not isinstance(images, Sequence) or isinstance(images, (str, bytes, bytearray, memoryview))
        images = [images] if one else images
        pixels = torch.stack([self.preprocess(self._image(im)) for im in images])
        return pixels.to(self.device, self.input_dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the model's image tower takes (float32, or its half precision after
        ``vlzoo.load(..., dtype=...)``; BLIP-2's frozen tower casts its own input)."""
        vision = getattr(self.model, "vision", self.model)
        return next((p.dtype for p in vision.parameters() if p.is_floating_point()), torch.float32)

    def _image(self, image):
        """A PIL image as is; a path or bytes decoded as the reference reads files (EXIF
        orientation applied only when ``exif_transpose``); an array or tensor as a PIL image."""
        if isinstance(image, (str, Path, bytes, bytearray, memoryview)):
            return load_image(bytes(image) if isinstance(image, memoryview) else image,
                              exif_transpose=self.exif_transpose)
        if isinstance(image, Tensor):  # (C, H, W) uint8, as torchvision reads images
            image = image.permute(1, 2, 0).squeeze(-1).cpu().numpy() if image.dim() == 3 else image.cpu().numpy()
        if isinstance(image, np.ndarray):
            return Image.fromarray(image)
        return image

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


def load(ref: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         image_conversion: str = "reference", exif_transpose: bool | None = None) -> ZooModel:
    """A pretrained model in eval mode, with ``.preprocess`` (the checkpoint's own image
    pipeline) and ``.tokenizer``. See the module docstring for what ``ref`` may be, and
    :meth:`ZooModel.set_image_options` for ``image_conversion`` and ``exif_transpose``.

    ``dtype``: ``torch.float16``, ``torch.bfloat16``, ``torch.float32`` or None (as
    stored). BLIP-2 runs its frozen parts in it (the vision tower; stage 2's LLM) and keeps
    ``ln_vision``, the Q-Former with its queries and the projections (``llm_proj``) in
    float32, as transformers and LAVIS do (a float16 Q-Former overflows); its LLM is read
    from a transformers directory straight into ``dtype``, one tensor at a time, never as
    a float32 copy. CLIP, ALBEF and BLIP have no frozen part: the whole model is cast, as
    ``model.to(dtype)``. Anything else is a ValueError. ``device``: where the model goes
    after loading."""
    model = ZooModel(load_parts(ref, dtype), image_conversion, exif_transpose)
    return model.to(device) if device is not None else model
