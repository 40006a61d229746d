"""Image preprocessing as the checkpoint's own reference does it: PIL image -> (3, H, W) float.

A published figure was produced by one specific pipeline (decoding, colour conversion,
resize rule and rounding, crop offsets, normalisation). A loaded model keeps the pipeline of
the release it came from, described by an :class:`ImagePipeline`:

- ``vlzoo``: a model vlzoo trained, preprocessed as its training data was
  (:func:`vlzoo.data.images.to_rgb`, PIL bicubic resize of the shorter side + centre crop or
  a squash to S x S, then mean/std);
- ``open_clip``: open_clip's own evaluation transform for the checkpoint's preprocessing
  config (``size``, ``mode``, ``mean``, ``std``, ``interpolation``, ``resize_mode``,
  ``fill_color``), built by ``open_clip.image_transform_v2``;
- ``transformers``: the image processor a directory's ``preprocessor_config.json``
  describes, built by transformers itself (its resize rule, rounding, crop offset
  ``(W - S) // 2``, ``do_convert_rgb``, rescale factor);
- ``original``: the ALBEF / BLIP repositories' evaluation transform: ``convert("RGB")``,
  torchvision's bicubic resize of the PIL image to S x S, ``ToTensor``, normalisation.

Colour conversion (``conversion``): ``reference`` leaves it to the pipeline (open_clip
converts after resizing, so a palette image is resized as palette indices; ``convert("RGB")``
clips 16-bit values and drops alpha; transformers composites alpha onto white).
``vlzoo`` first converts with :func:`~vlzoo.data.images.to_rgb` (palette expanded before
resizing, alpha composited onto white, 16-bit scaled to 8 bits), then runs the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlzoo.data.images import decode, to_rgb

PIPELINE_KINDS = ("vlzoo", "open_clip", "transformers", "original")
CONVERSIONS = ("reference", "vlzoo")

ImageTransform = Callable[[Image.Image], Tensor]


@dataclass
class ImagePipeline:
    """Which reference turns a PIL image into pixel values, and its settings.

    ``settings`` by kind: ``vlzoo``: none (the model's vision config decides); ``open_clip``:
    open_clip ``PreprocessCfg`` fields; ``transformers``: the image processor's dictionary
    (``preprocessor_config.json``, ``image_processor_type`` naming its class);
    ``original``: ``size``, ``mean``, ``std``.
    """

    kind: str = "vlzoo"
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in PIPELINE_KINDS:
            raise ValueError(f"image pipeline kind must be one of {PIPELINE_KINDS}, got {self.kind!r}")


def build_image_transform(pipeline: ImagePipeline, vision, conversion: str = "reference") -> ImageTransform:
    """The (3, H, W) float32 transform of ``pipeline`` (``vision``: the model's
    :class:`~vlzoo.config.VisionConfig`, read by the ``vlzoo`` kind). ``conversion``: see
    the module docstring."""
    if conversion not in CONVERSIONS:
        raise ValueError(f"image conversion must be one of {CONVERSIONS}, got {conversion!r}")
    builders = {"vlzoo": _vlzoo_transform, "open_clip": _open_clip_transform,
                "transformers": _transformers_transform, "original": _original_transform}
    transform = builders[pipeline.kind](pipeline.settings, vision)
    if conversion == "reference" or pipeline.kind == "vlzoo":
        return transform
    return lambda image: transform(to_rgb(image))


def _vlzoo_transform(settings: dict[str, Any], vision) -> ImageTransform:
    """vlzoo's training pipeline: the data readers' :func:`~vlzoo.data.images.decode` (to_rgb,
    PIL bicubic resize by ``vision.resize_mode``, whatever ``vision.interpolation`` says), mean/std."""
    mean, std = _stats(vision.mean), _stats(vision.std)

    def transform(image: Image.Image) -> Tensor:
        return (decode(image, vision.image_size, vision.resize_mode).float() / 255.0 - mean) / std

    return transform


def _stats(values: Sequence[float]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(3, 1, 1)


def _open_clip_transform(settings: dict[str, Any], vision) -> ImageTransform:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**settings), is_train=False)


def _transformers_transform(settings: dict[str, Any], vision) -> ImageTransform:
    processor = transformers_processor(settings)

    def transform(image: Image.Image) -> Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0].float()

    return transform


RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL codes


def pipeline_statistics(pipeline: ImagePipeline | None) -> dict[str, Any]:
    """``mean``, ``std`` and ``interpolation`` of a transformers pipeline's processor, for the
    model's vision config (what fine-tuning and an export record); {} without a pipeline."""
    if pipeline is None or pipeline.kind != "transformers":
        return {}
    settings = pipeline.settings
    stats: dict[str, Any] = {k: tuple(settings[f"image_{k}"]) for k in ("mean", "std") if settings.get(f"image_{k}")}
    resample = settings.get("resample", 3)
    name = resample.lower() if isinstance(resample, str) else RESAMPLE_NAMES.get(resample, "bicubic")
    stats["interpolation"] = name if name in ("bilinear", "bicubic") else "bicubic"
    return stats


def transformers_processor(settings: dict[str, Any]):
    """The transformers image processor of a ``preprocessor_config.json`` dictionary."""
    import transformers

    name = settings.get("image_processor_type")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_dict"):
        raise ValueError(f"preprocessor_config.json: image_processor_type {name!r} is not a transformers image "
                         "processor class")
    return cls.from_dict(settings)


def _original_transform(settings: dict[str, Any], vision) -> ImageTransform:
    """ALBEF's / BLIP's evaluation transform (``transforms.Resize((S, S), BICUBIC)`` of the PIL image)."""
    from torchvision import transforms

    size = int(settings["size"])
    pipeline = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(list(settings["mean"]), list(settings["std"])),
    ])
    return lambda image: pipeline(image.convert("RGB"))


# ------------------------------------------------------------------ pipelines of sources
def open_clip_pipeline(image_size: int, *configs: dict[str, Any] | None) -> ImagePipeline:
    """open_clip's pipeline: its ``PreprocessCfg`` defaults, then each of ``configs`` (a hub
    config's ``preprocess_cfg``, a pretrained tag's settings) merged in order, as open_clip's
    factory merges them; the size is the vision tower's."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    merged = asdict(PreprocessCfg())
    for config in configs:
        merged = merge_preprocess_dict(merged, config or {})
    merged["size"] = image_size
    return ImagePipeline("open_clip", {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()})


def original_pipeline(vision) -> ImagePipeline:
    """The original ALBEF / BLIP release's pipeline for a vision config (size, mean, std)."""
    return ImagePipeline("original", {"size": vision.image_size, "mean": list(vision.mean), "std": list(vision.std)})


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the hub's; transformers 5 saves the second


def transformers_pipeline(directory) -> ImagePipeline | None:
    """The image processor of a transformers directory (None without one of
    :data:`PROCESSOR_FILES`), as ``AutoImageProcessor.from_pretrained`` builds it (its class recorded)."""
    if not any((Path(directory) / name).is_file() for name in PROCESSOR_FILES):
        return None
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(directory))
    settings = json.loads(processor.to_json_string())  # plain JSON values: an export writes them back
    return ImagePipeline("transformers", {**settings, "image_processor_type": type(processor).__name__})
