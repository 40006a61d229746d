"""CLIP converters against the reference implementations: open_clip ``CLIP`` (ViT and
ModifiedResNet towers) and transformers ``CLIPModel``, at tiny random sizes."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vlzoo.hub.convert.clip import (
    build_converted_clip,
    clip_config_from_open_clip,
    convert_open_clip_state,
    hf_clip_to_open_clip,
    load_open_clip_dir,
    open_clip_config_from_hf,
)
from vlzoo.hub.loaders import load_hf_dir, load_path
from vlzoo.weights import CheckpointKeyError

VIT_CFG = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2}}
RN_CFG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 2}}


def _open_clip_model(cfg: dict) -> open_clip.CLIP:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg")}
    model = open_clip.CLIP(vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"], **kwargs).eval()
    with torch.no_grad():  # non-trivial values everywhere (open_clip inits some to zero/one)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _texts(vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids whose end-of-text token (the highest id) ends each row, padded with 0."""
    ids = torch.randint(1, vocab - 1, (3, length))
    mask = torch.ones_like(ids)
    for row, end in enumerate((length - 1, 5, 2)):
        ids[row, end] = vocab - 1
        ids[row, end + 1:] = 0
        mask[row, end + 1:] = 0
    return ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [VIT_CFG, RN_CFG], ids=["vit", "modified_resnet"])
def test_open_clip_parity(cfg):
    ref = _open_clip_model(cfg)
    parts = build_converted_clip(clip_config_from_open_clip(cfg), convert_open_clip_state(ref.state_dict()),
                                 "test", tokenizer=False)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size)
    ids, mask = _texts(100, 16)
    with torch.no_grad():
        ref_img, ref_txt = ref.encode_image(images, normalize=True), ref.encode_text(ids, normalize=True)
        ours = parts.model
        assert _max_diff(ours.encode_image(images), ref_img) <= 1e-5
        assert _max_diff(ours.encode_text(ids, mask), ref_txt) <= 1e-5
        assert _max_diff(ours.encode_text(ids), ref_txt) <= 1e-5  # no mask: argmax (EOT) pooling
        assert torch.equal(ours.logit_scale, ref.logit_scale)


def test_open_clip_hub_directory(tmp_path):
    ref = _open_clip_model(VIT_CFG)
    save_file(ref.state_dict(), tmp_path / "open_clip_model.safetensors")
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT_CFG, "preprocess_cfg": preprocess}))
    parts = load_open_clip_dir(tmp_path)
    assert parts.preprocess.mean == (0.5, 0.5, 0.5) and parts.preprocess.interpolation == "bilinear"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(parts.model.encode_image(images), ref.encode_image(images, normalize=True)) <= 1e-5


def test_open_clip_missing_and_unexpected_keys_are_named():
    ref = _open_clip_model(VIT_CFG)
    state = convert_open_clip_state(ref.state_dict())
    state.pop("vision.tower.ln_post.weight")
    state["vision.tower.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match=r"vision\.tower\.ln_post\.weight.*vision\.tower\.extra"):
        build_converted_clip(clip_config_from_open_clip(VIT_CFG), state, "test", tokenizer=False)
    with pytest.raises(KeyError, match="no conversion rule.*surprise"):
        convert_open_clip_state({**ref.state_dict(), "surprise.weight": torch.zeros(1)})


def _converted(cfg: dict):
    """(open_clip reference, vlzoo CLIP converted from it) for the model config ``cfg``."""
    ref = _open_clip_model(cfg)
    parts = build_converted_clip(clip_config_from_open_clip(cfg), convert_open_clip_state(ref.state_dict()),
                                 "test", tokenizer=False)
    return ref, parts.model


def _with(cfg: dict, tower: str, **changes) -> dict:
    return {**cfg, tower: {**cfg[tower], **changes}}


@pytest.mark.parametrize("changes", [{"pool_type": "first"}, {"pool_type": "last"}, {"no_causal_mask": True}],
                         ids=["first", "last", "no_causal_mask"])
def test_open_clip_text_pooling_parity(changes):
    ref, ours = _converted(_with(VIT_CFG, "text_cfg", **changes))
    ids, mask = _texts(100, 16)
    short_ids, short_mask = ids[1:], mask[1:]  # rows end by position 5: pad to 8 only, as vlzoo's tokenizer does
    with torch.no_grad():
        expected = ref.encode_text(ids, normalize=True)
        assert _max_diff(ours.encode_text(ids, mask), expected) <= 1e-5
        assert _max_diff(ours.encode_text(ids), expected) <= 1e-5
        assert _max_diff(ours.encode_text(short_ids[:, :8], short_mask[:, :8]), expected[1:]) <= 1e-5


@pytest.mark.parametrize("pool_type", ["eos", "none"])
def test_open_clip_unsupported_text_pooling_is_rejected(pool_type):
    with pytest.raises(ValueError, match=f"text_cfg.pool_type '{pool_type}' is not supported"):
        build_converted_clip(clip_config_from_open_clip(_with(VIT_CFG, "text_cfg", pool_type=pool_type)), {},
                             "test", tokenizer=False)


@pytest.mark.parametrize("key", ["hf_tokenizer_name", "hf_model_name"])
def test_open_clip_hugging_face_text_is_rejected(key):
    with pytest.raises(ValueError, match=f"text_cfg.{key}='bert-base-uncased'.*not supported"):
        clip_config_from_open_clip(_with(VIT_CFG, "text_cfg", **{key: "bert-base-uncased"}))


def test_open_clip_attentional_pool_parity():
    cfg = _with(VIT_CFG, "vision_cfg", attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    ref, ours = _converted(cfg)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours.encode_image(images), ref.encode_image(images, normalize=True)) <= 1e-5
        assert ours.vision(images).tokens.shape == (2, 4, 32)  # the pooler's queries, embed_dim wide


@pytest.mark.parametrize("changes, message", [
    ({"timm_model_name": "vit_base_patch16_224"}, "timm_model_name.*use vision impl timm"),
    ({"attentional_pool": "parallel"}, "attentional_pool='parallel' is not supported"),
    ({"pool_type": "none"}, "pool_type 'none' is not supported"),
])
def test_open_clip_unsupported_vision_towers_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        build_converted_clip(clip_config_from_open_clip(_with(VIT_CFG, "vision_cfg", **changes)), {},
                             "test", tokenizer=False)


def test_open_clip_hub_directory_with_timm_config_json(tmp_path):
    ref = _open_clip_model(VIT_CFG)
    save_file(ref.state_dict(), tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT_CFG}))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch32_clip_224"}))
    parts = load_path(tmp_path)
    assert parts.family == "clip"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(parts.model.encode_image(images), ref.encode_image(images, normalize=True)) <= 1e-5


def _hf_clip(act: str = "quick_gelu", text_mlp: tuple[int, int] = (32, 64), vision_mlp: tuple[int, int] = (48, 96)):
    """A tiny transformers CLIPModel; ``*_mlp``: (hidden_size, intermediate_size) of each tower."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=text_mlp[0], intermediate_size=text_mlp[1], num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act=act, eos_token_id=2),
        vision_config=dict(hidden_size=vision_mlp[0], intermediate_size=vision_mlp[1], num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=32,
    )
    return CLIPModel(config).eval()


@pytest.mark.parametrize("act, mlp", [("quick_gelu", None), ("gelu", None), ("gelu", (56, 61))],
                         ids=["quick_gelu", "gelu", "intermediate_61_of_56"])
def test_transformers_clip_parity(act, mlp):
    ref = _hf_clip(act, *([mlp, mlp] if mlp else []))
    cfg = open_clip_config_from_hf(ref.config.to_dict())
    parts = build_converted_clip(clip_config_from_open_clip(cfg),
                                 convert_open_clip_state(hf_clip_to_open_clip(ref.state_dict())), "test",
                                 tokenizer=False)
    images = torch.randn(2, 3, 32, 32)
    ids, mask = _texts(100, 16)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=images)
        img, txt = parts.model.encode_image(images), parts.model.encode_text(ids, mask)
        assert _max_diff(img, out.image_embeds) <= 1e-5
        assert _max_diff(txt, out.text_embeds) <= 1e-5
        assert _max_diff(parts.model.logit_scale.exp() * img @ txt.t(), out.logits_per_image) <= 1e-4


def test_transformers_clip_directory(tmp_path):
    ref = _hf_clip()
    ref.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5], "resample": 3}))
    parts = load_hf_dir(tmp_path)
    assert parts.family == "clip" and parts.preprocess.mean == (0.1, 0.2, 0.3)
    images = torch.randn(2, 3, 32, 32)
    ids, mask = _texts(100, 16)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=images)
        assert _max_diff(parts.model.encode_image(images), out.image_embeds) <= 1e-5


def test_transformers_directory_errors_name_the_file_and_what_was_expected(tmp_path):
    ref = _hf_clip()
    state = {k: v for k, v in ref.state_dict().items() if k != "visual_projection.weight"}
    ref.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(CheckpointKeyError, match="no visual_projection.weight"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "clip", oops}')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON \(line 1, column 24.*model_type"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a transformers config object"):
        load_hf_dir(tmp_path)
