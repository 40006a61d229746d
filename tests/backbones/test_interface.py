"""Every backbone implementation honours the one interface."""

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower

from vlzoo.backbones import (
    BertTextEncoder,
    OpenCLIPTextEncoder,
    OpenCLIPVisionEncoder,
    TimmVisionEncoder,
    build_text_encoder,
    build_vision_encoder,
)
from vlzoo.config import TextConfig, VisionConfig
from vlzoo.data.tokenizers import OpenCLIPTokenizer, ShapesTokenizer
from vlzoo.layers.transformer import BertConfig

TINY_VIT = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)
TINY_OC_VIT = dict(layers=3, width=32, head_width=16, patch_size=8)
TINY_OC_RN = dict(layers=[1, 1, 1, 1], width=8, head_width=8)
TINY_OC_ATTN_POOL = dict(TINY_OC_VIT, attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)


def vision_encoders():
    return {
        "timm-vit": lambda **kw: TimmVisionEncoder("vit_tiny_patch16_224", image_size=32, **kw, **TINY_VIT),
        "timm-eva": lambda **kw: TimmVisionEncoder("eva02_tiny_patch14_224", image_size=28, **kw,
                                                   patch_size=7, embed_dim=32, depth=3, num_heads=2),
        "open_clip-vit": lambda **kw: OpenCLIPVisionEncoder(24, image_size=32, **kw, **TINY_OC_VIT),
        "open_clip-resnet": lambda **kw: OpenCLIPVisionEncoder(24, image_size=64, **kw, **TINY_OC_RN),
        "open_clip-vit-attn-pool": lambda **kw: OpenCLIPVisionEncoder(24, image_size=32, **kw, **TINY_OC_ATTN_POOL),
    }


def text_encoders():
    shapes_tok = ShapesTokenizer(16)
    return {
        "open_clip": (lambda: OpenCLIPTextEncoder(24, shapes_tok.vocab_size, 16, width=32, heads=2, layers=2), shapes_tok),
        "bert": (lambda: BertTextEncoder(BertConfig(vocab_size=shapes_tok.vocab_size, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64)), shapes_tok),
    }


@pytest.mark.parametrize("name", list(vision_encoders()))
def test_vision_encoder_interface(name):
    encoder = vision_encoders()[name]()
    x = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    out = encoder(x)
    assert out.tokens.ndim == 3 and out.tokens.shape[0] == 2 and out.tokens.shape[2] == encoder.width
    assert out.pooled.shape == (2, encoder.pooled_width)
    # gradient checkpointing changes memory, not results
    encoder.train()
    torch.manual_seed(0)
    ref = encoder(x).pooled
    encoder.set_grad_checkpointing(True)
    torch.manual_seed(0)
    ckpt = encoder(x).pooled
    torch.testing.assert_close(ckpt, ref)
    ckpt.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
    # lock(): frozen and stays in eval mode
    encoder.lock()
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("name", ["timm-vit", "timm-eva", "open_clip-vit"])
def test_penultimate_output_layer(name):
    full = vision_encoders()[name]()
    penultimate = vision_encoders()[name](output_layer=-2)
    penultimate.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, full.image_size, full.image_size)
    a, b = full(x).tokens, penultimate(x).tokens
    assert a.shape == b.shape
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="output_layer"):
        vision_encoders()[name](output_layer=-9)


@pytest.mark.parametrize("name", ["timm-vit", "open_clip-vit"])
def test_patch_dropout_only_while_training(name):
    encoder = vision_encoders()[name](patch_dropout=0.5)
    x = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    n_patches = (encoder.image_size // 8) ** 2
    encoder.train()
    assert encoder(x).tokens.shape[1] == 1 + n_patches // 2
    encoder.eval()
    assert encoder(x).tokens.shape[1] == 1 + n_patches


@pytest.mark.parametrize("name", list(text_encoders()))
def test_text_encoder_interface(name):
    build, tok = text_encoders()[name]
    encoder = build().eval()  # no dropout while comparing
    batch = tok(["a large red circle", "a small blue square above a large green star"])
    out = encoder(batch["input_ids"], batch["attention_mask"])
    assert out.tokens.shape == (*batch["input_ids"].shape, encoder.width)
    assert out.pooled.shape == (2, encoder.pooled_width)
    # padding does not change a row's pooled output
    padded = {k: torch.nn.functional.pad(v, (0, 5)) for k, v in batch.items()}
    torch.testing.assert_close(encoder(**padded).pooled, out.pooled, atol=1e-5, rtol=1e-5)
    encoder.set_grad_checkpointing(True)
    encoder.train()
    encoder(batch["input_ids"], batch["attention_mask"]).pooled.sum().backward()
    encoder.lock()
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("tower, image_size", [(TINY_OC_VIT, 32), (TINY_OC_RN, 64), (TINY_OC_ATTN_POOL, 32)],
                         ids=["vit", "resnet", "vit-attn-pool"])
def test_open_clip_vision_tower_matches_open_clip(tower, image_size):
    ours = OpenCLIPVisionEncoder(24, image_size=image_size, **tower).eval()
    ref = _build_vision_tower(24, CLIPVisionCfg(image_size=image_size, **tower)).eval()
    ref.load_state_dict({k.removeprefix("tower."): v for k, v in ours.state_dict().items()})
    x = torch.randn(3, 3, image_size, image_size)
    torch.testing.assert_close(ours(x).pooled, ref(x), atol=1e-6, rtol=1e-5)


def test_open_clip_text_tower_matches_open_clip():
    tok = OpenCLIPTokenizer(77)
    ours = OpenCLIPTextEncoder(24, tok.vocab_size, 77, width=32, heads=2, layers=2).eval()
    ref = _build_text_tower(24, CLIPTextCfg(width=32, heads=2, layers=2)).eval()
    ref.load_state_dict({k.removeprefix("tower."): v for k, v in ours.state_dict().items()})
    texts = ["a photo of a cat", "two red squares to the left of a blue circle"]
    batch = tok(texts)
    torch.testing.assert_close(ours(**batch).pooled, ref(open_clip.tokenize(texts)), atol=1e-6, rtol=1e-5)


def test_build_from_config_by_name():
    tok = ShapesTokenizer(16)
    v = build_vision_encoder(VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=32, kwargs=TINY_VIT,
                                          locked=True), embed_dim=24)
    assert v.locked
    t = build_text_encoder(TextConfig(impl="bert", tokenizer="shapes", context_length=16,
                                      kwargs=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64)), 24, tok)
    assert t.config.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="vision.impl"):
        build_vision_encoder(VisionConfig(impl="nope"), 24)
    with pytest.raises(ValueError, match="unknown BertConfig fields"):
        build_text_encoder(TextConfig(impl="bert", kwargs={"hiden_size": 3}), 24, tok)
