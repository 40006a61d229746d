"""Original ALBEF / BLIP release checkpoints -> vlzoo, on tiny files written with the
original key names (from salesforce/ALBEF models/{model_pretrain,model_retrieval,vit,
xbert}.py and salesforce/BLIP models/{blip,blip_pretrain,blip_retrieval,vit,med}.py)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlzoo.hub.loaders import load_original_entry
from vlzoo.weights import CheckpointKeyError

DV, DT, E, Q = 24, 32, 16, 32  # ViT width, text width, ITC dim, queue size
HEADS = 2

# ---------------------------------------------------------------- original names
# "name shape" per line; V is the vocabulary, {L} a text layer index.
VIT = """
cls_token 1,1,24
pos_embed 1,5,24
patch_embed.proj.weight 24,3,8,8
patch_embed.proj.bias 24
blocks.0.norm1.weight 24
blocks.0.norm1.bias 24
blocks.0.attn.qkv.weight 72,24
blocks.0.attn.qkv.bias 72
blocks.0.attn.proj.weight 24,24
blocks.0.attn.proj.bias 24
blocks.0.norm2.weight 24
blocks.0.norm2.bias 24
blocks.0.mlp.fc1.weight 96,24
blocks.0.mlp.fc1.bias 96
blocks.0.mlp.fc2.weight 24,96
blocks.0.mlp.fc2.bias 24
norm.weight 24
norm.bias 24
"""
EMBEDDINGS = """
embeddings.word_embeddings.weight V,32
embeddings.position_embeddings.weight 32,32
embeddings.LayerNorm.weight 32
embeddings.LayerNorm.bias 32
"""
TOKEN_TYPES = "embeddings.token_type_embeddings.weight 2,32"  # ALBEF (xbert.py); BLIP's MED has none
SELF_ATTENTION = """
encoder.layer.{L}.attention.self.query.weight 32,32
encoder.layer.{L}.attention.self.query.bias 32
encoder.layer.{L}.attention.self.key.weight 32,32
encoder.layer.{L}.attention.self.key.bias 32
encoder.layer.{L}.attention.self.value.weight 32,32
encoder.layer.{L}.attention.self.value.bias 32
encoder.layer.{L}.attention.output.dense.weight 32,32
encoder.layer.{L}.attention.output.dense.bias 32
encoder.layer.{L}.attention.output.LayerNorm.weight 32
encoder.layer.{L}.attention.output.LayerNorm.bias 32
"""
CROSS_ATTENTION = """
encoder.layer.{L}.crossattention.self.query.weight 32,32
encoder.layer.{L}.crossattention.self.query.bias 32
encoder.layer.{L}.crossattention.self.key.weight 32,24
encoder.layer.{L}.crossattention.self.key.bias 32
encoder.layer.{L}.crossattention.self.value.weight 32,24
encoder.layer.{L}.crossattention.self.value.bias 32
encoder.layer.{L}.crossattention.output.dense.weight 32,32
encoder.layer.{L}.crossattention.output.dense.bias 32
encoder.layer.{L}.crossattention.output.LayerNorm.weight 32
encoder.layer.{L}.crossattention.output.LayerNorm.bias 32
"""
FEED_FORWARD = """
encoder.layer.{L}.intermediate.dense.weight 64,32
encoder.layer.{L}.intermediate.dense.bias 64
encoder.layer.{L}.output.dense.weight 32,64
encoder.layer.{L}.output.dense.bias 32
encoder.layer.{L}.output.LayerNorm.weight 32
encoder.layer.{L}.output.LayerNorm.bias 32
"""
LM_HEAD = """
cls.predictions.bias V
cls.predictions.transform.dense.weight 32,32
cls.predictions.transform.dense.bias 32
cls.predictions.transform.LayerNorm.weight 32
cls.predictions.transform.LayerNorm.bias 32
cls.predictions.decoder.weight V,32
cls.predictions.decoder.bias V
"""
HEADS_AND_TEMP = """
vision_proj.weight 16,24
vision_proj.bias 16
text_proj.weight 16,32
text_proj.bias 16
itm_head.weight 2,32
itm_head.bias 2
temp
"""
MOMENTUM_PROJ = """
vision_proj_m.weight 16,24
vision_proj_m.bias 16
text_proj_m.weight 16,32
text_proj_m.bias 16
"""


def table(text: str, prefix: str = "", layer: int | None = None) -> list[tuple[str, str]]:
    """(original name, shape text) pairs of a table under ``prefix``."""
    lines = [line.split(" ") for line in text.strip().splitlines()]
    return [(prefix + parts[0].replace("{L}", str(layer)), parts[1] if len(parts) > 1 else "") for parts in lines]


def bert(prefix: str, layers: list[bool], token_types: bool) -> list[tuple[str, str]]:
    """A BERT under ``prefix``; ``layers[i]``: layer i has cross-attention."""
    keys = table(EMBEDDINGS, prefix) + (table(TOKEN_TYPES, prefix) if token_types else [])
    for i, cross in enumerate(layers):
        keys += table(SELF_ATTENTION, prefix, i) + (table(CROSS_ATTENTION, prefix, i) if cross else [])
        keys += table(FEED_FORWARD, prefix, i)
    return keys


def albef_keys(pretrain: bool) -> list[tuple[str, str]]:
    """ALBEF (1 ViT block, 1 text + 1 fusion layer): BertForMaskedLM in pre-training
    (model_pretrain.py), BertModel without pooler when fine-tuned (model_retrieval.py)."""
    text = "text_encoder{}.bert." if pretrain else "text_encoder{}."
    keys = table(VIT, "visual_encoder.") + bert(text.format(""), [False, True], token_types=True)
    keys += table(VIT, "visual_encoder_m.") + bert(text.format("_m"), [False, True], token_types=True)
    if pretrain:
        keys += table(LM_HEAD, "text_encoder.") + table(LM_HEAD, "text_encoder_m.")
    return keys + table(HEADS_AND_TEMP) + table(MOMENTUM_PROJ)


def blip_keys(encoder: bool, decoder: bool) -> list[tuple[str, str]]:
    """BLIP (1 ViT block, 1 MED layer): blip_pretrain.py has both, blip_retrieval.py the
    encoder side, blip.py's BLIP_Decoder only visual_encoder + text_decoder."""
    keys = table(VIT, "visual_encoder.")
    if encoder:
        keys += bert("text_encoder.", [True], token_types=False) + table(VIT, "visual_encoder_m.")
        keys += bert("text_encoder_m.", [True], token_types=False) + table(HEADS_AND_TEMP) + table(MOMENTUM_PROJ)
    if decoder:
        keys += bert("text_decoder.bert.", [True], token_types=False) + table(LM_HEAD, "text_decoder.")
    return keys


def random_state(keys: list[tuple[str, str]], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys:
        dims = tuple(vocab if d == "V" else int(d) for d in shape.split(",")) if shape else ()
        if name.endswith("position_ids"):
            state[name] = torch.arange(dims[1])[None]
        else:
            state[name] = 0.1 * torch.randn(dims, generator=g) + (1.0 if "LayerNorm.weight" in name else 0.0)
    for prefix in ("text_encoder.", "text_encoder_m.", "text_decoder."):  # the original's tied tensors
        head = prefix + "cls.predictions."
        if head + "bias" in state:
            state[head + "decoder.bias"] = state[head + "bias"]
            state[head + "decoder.weight"] = state[prefix + "bert.embeddings.word_embeddings.weight"]
    state["temp"] = torch.tensor(0.05)
    return state


def queues(ids: bool, ptr_name: str = "queue_ptr") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {"image_queue": F.normalize(torch.randn(E, Q, generator=g), dim=0),
           "text_queue": F.normalize(torch.randn(E, Q, generator=g), dim=0), ptr_name: torch.tensor([8])}
    if ids:
        out["idx_queue"] = torch.cat([torch.arange(8), torch.full((Q - 8,), -100)])[None]
    return out


# ------------------------------------------------------------------ the files
def zoo_config(tmp_path, family: str) -> str:
    """A tiny zoo config (the manifest entry's ``config``; absolute, so the repo root is ignored)."""
    task = {"albef": "ALBEFTask", "blip": "BLIPTask"}[family]
    layers, extra = (2, "      fusion_layers: 1\n") if family == "albef" else (1, "")
    eps = "norm_eps: 1.0e-5, " if family == "blip" else ""  # as the BLIP zoo configs (transformers' value)
    text = f"""model:
  class_path: vlzoo.tasks.{task}
  init_args:
    model:
      embed_dim: {E}
      queue_size: {Q}
{extra}      vision:
        impl: timm
        name: vit_tiny_patch16_224
        image_size: 16
        mean: [0.5, 0.5, 0.5]
        std: [0.5, 0.5, 0.5]
        kwargs: {{{eps}patch_size: 8, embed_dim: {DV}, depth: 1, num_heads: {HEADS}}}
      text:
        impl: bert
        tokenizer: shapes
        context_length: 24
        kwargs: {{hidden_size: {DT}, num_hidden_layers: {layers}, num_attention_heads: {HEADS},
                 intermediate_size: 64, max_position_embeddings: 32}}
"""
    path = tmp_path / f"{family}.yaml"
    path.write_text(text)
    return str(path)


def entry(tmp_path, family: str) -> SimpleNamespace:
    return SimpleNamespace(name=f"{family}-tiny-original", family=family, format=f"{family}_original",
                           config=zoo_config(tmp_path, family))


@pytest.fixture(scope="module")
def vocab() -> int:
    from vlzoo.data.tokenizers import build_tokenizer

    return build_tokenizer("shapes", 24, blip_tokens=True).vocab_size


def save(tmp_path, state: dict, name: str = "model.pth", **outer):
    path = tmp_path / name
    torch.save({"model": state, "epoch": 3, "config": {"queue_size": Q, "embed_dim": E}, **outer}, path)
    return path


# --------------------------------------------------------------- by hand
def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _attend(q, k, v):
    split = lambda t: t.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


def vit_cls_by_hand(sd: dict, p: str, pixels: torch.Tensor) -> torch.Tensor:
    """The original ViT (vit.py: pre-norm blocks, LayerNorm eps 1e-6): (B, 3, 16, 16) -> (B, DV) [CLS]."""
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[p + "pos_embed"]
    q, k, v = _lin(_ln(x, sd, p + "blocks.0.norm1", 1e-6), sd, p + "blocks.0.attn.qkv").chunk(3, -1)
    x = x + _lin(_attend(q, k, v), sd, p + "blocks.0.attn.proj")
    h = F.gelu(_lin(_ln(x, sd, p + "blocks.0.norm2", 1e-6), sd, p + "blocks.0.mlp.fc1"))
    x = x + _lin(h, sd, p + "blocks.0.mlp.fc2")
    return _ln(x, sd, p + "norm", 1e-6)[:, 0]


def bert_cls_by_hand(sd: dict, p: str, ids: torch.Tensor) -> torch.Tensor:
    """Embeddings (+ token type 0 when present) and text layer 0 (self-attention, no
    padding): (B, L) -> (B, DT) [CLS]."""
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    if p + "embeddings.token_type_embeddings.weight" in sd:
        x = x + sd[p + "embeddings.token_type_embeddings.weight"][0]
    x = _ln(x, sd, p + "embeddings.LayerNorm", 1e-12)
    a = p + "encoder.layer.0.attention."
    att = _attend(_lin(x, sd, a + "self.query"), _lin(x, sd, a + "self.key"), _lin(x, sd, a + "self.value"))
    x = _ln(_lin(att, sd, a + "output.dense") + x, sd, a + "output.LayerNorm", 1e-12)
    f = p + "encoder.layer.0."
    h = _lin(F.gelu(_lin(x, sd, f + "intermediate.dense")), sd, f + "output.dense")
    return _ln(h + x, sd, f + "output.LayerNorm", 1e-12)[:, 0]


def check_itc_by_hand(model, sd: dict, text_prefix: str, vocab: int) -> None:
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(5, vocab, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        image = F.normalize(_lin(vit_cls_by_hand(sd, "visual_encoder.", pixels), sd, "vision_proj"), dim=-1)
        text = F.normalize(_lin(bert_cls_by_hand(sd, text_prefix, ids), sd, "text_proj"), dim=-1)
        torch.testing.assert_close(model.encode_image(pixels), image, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids), text, atol=1e-5, rtol=0)


# --------------------------------------------------------------- expectations
def ours(name: str) -> str | None:
    """Where an original tensor must land in vlzoo (None: dropped); independent of the
    converter's rules, for the tests."""
    if name.endswith((".position_ids", "cls.predictions.decoder.bias")):
        return None
    own_attention = "text_decoder.bert.encoder.layer."
    if name.startswith(own_attention) and ".attention." in name:
        return "decoder.layer." + name[len(own_attention):]
    for old, new in (("visual_encoder_m.", "vision_m.model."), ("visual_encoder.", "vision.model."),
                     ("text_encoder_m.bert.", "text_m."), ("text_encoder.bert.", "text."),
                     ("text_encoder_m.cls.predictions.", "mlm_head_m."), ("text_encoder.cls.predictions.", "mlm_head."),
                     ("text_encoder_m.", "text_m."), ("text_encoder.", "text."),
                     ("text_decoder.cls.predictions.", "lm_head."), ("text_decoder.bert.", "text.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return name


def assert_landed(model, state: dict, skip=lambda name: False) -> None:
    own = model.state_dict()
    for name, value in state.items():
        target = ours(name)
        if target is not None and not skip(name):
            assert torch.equal(own[target], value), f"{name} -> {target}"


def assert_queue(model, q: dict) -> None:
    torch.testing.assert_close(model.queue.image, q["image_queue"].T, atol=0, rtol=0)  # (D, Q) -> (Q, D)
    torch.testing.assert_close(model.queue.text, q["text_queue"].T, atol=0, rtol=0)
    expected = torch.cat([torch.arange(8), torch.full((Q - 8,), -1)]) if "idx_queue" in q else torch.full((Q,), -1)
    assert torch.equal(model.queue.index, expected)
    assert int(model.queue.ptr) == 8 and model.queue.ptr.dim() == 0


# ---------------------------------------------------------------------- tests
def test_albef_pretrain_file(tmp_path, vocab):
    state = random_state(albef_keys(pretrain=True), vocab)
    q = queues(ids=False)
    parts = load_original_entry(entry(tmp_path, "albef"), save(tmp_path, {**state, **q}, optimizer={"state": {}}))
    model = parts.model
    assert parts.family == "albef" and parts.capabilities == {"encode", "itm"} and parts.source == "albef-tiny-original"
    assert_landed(model, state)
    assert torch.equal(model.vision.model.blocks[0].attn.qkv.weight, state["visual_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(model.mlm_head.decoder.weight, state["text_encoder.bert.embeddings.word_embeddings.weight"])
    assert_queue(model, q)
    assert parts.extra["absent"] == () and model.temp.item() == pytest.approx(0.05)
    assert_original_pipeline(parts)
    check_itc_by_hand(model, state, "text_encoder.bert.", vocab)


def test_albef_finetuned_file_without_momentum(tmp_path, vocab):
    """A retrieval fine-tune (BertModel text encoder, idx_queue), its momentum copies removed."""
    state = {k: v for k, v in random_state(albef_keys(pretrain=False), vocab).items() if "_m." not in k}
    q = queues(ids=True)
    parts = load_original_entry(entry(tmp_path, "albef"), save(tmp_path, {**state, **q}))
    model = parts.model
    assert_landed(model, state)
    assert_queue(model, q)
    assert torch.equal(model.text_m.encoder.layer[1].crossattention.self.key.weight,
                       state["text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(model.vision_proj_m.weight, state["vision_proj.weight"])
    assert "mlm_head.transform." in parts.extra["absent"] and parts.capabilities == {"encode", "itm"}
    check_itc_by_hand(model, state, "text_encoder.", vocab)


@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "caption", "untied_lm_head"])
def test_blip_files(tmp_path, vocab, kind):
    encoder, decoder = kind != "caption", kind != "retrieval"
    state = random_state(blip_keys(encoder, decoder), vocab)
    if encoder and decoder:  # pre-training ties all but the decoder's self-attention to the encoder
        for name in [k for k in state if k.startswith("text_decoder.bert.") and ".attention." not in k]:
            state[name] = state[name.replace("text_decoder.bert.", "text_encoder.")]
        if kind == "untied_lm_head":
            state["text_decoder.cls.predictions.decoder.weight"] = torch.randn(vocab, DT)
        else:
            state["text_decoder.cls.predictions.decoder.weight"] = state["text_encoder.embeddings.word_embeddings.weight"]
    q = queues(ids=kind == "retrieval", ptr_name="ptr_queue" if kind == "retrieval" else "queue_ptr")
    parts = load_original_entry(entry(tmp_path, "blip"), save(tmp_path, {**state, **(q if encoder else {})}))
    model = parts.model
    expected = {"pretrain": {"encode", "itm", "generate"}, "retrieval": {"encode", "itm"}, "caption": {"generate"},
                "untied_lm_head": {"encode", "itm"}}[kind]
    assert parts.capabilities == expected, parts.extra["notes"]
    assert_original_pipeline(parts)
    assert_landed(model, state, skip=lambda n: n == "text_decoder.cls.predictions.decoder.weight")
    assert torch.equal(model.text.embeddings.token_type_embeddings.weight, torch.zeros(2, DT))  # MED has none
    assert all(m.eps == 1e-6 for m in model.vision.modules() if isinstance(m, torch.nn.LayerNorm))
    assert parts.config.vision.kwargs["norm_eps"] == 1e-6
    if decoder:  # the decoder's own self-attention; cross-attention/FFN are the encoder's modules
        assert torch.equal(model.decoder.layer[0].attention.self.query.weight,
                           state["text_decoder.bert.encoder.layer.0.attention.self.query.weight"])
        assert model.decoder.layer[0].crossattention is model.text.encoder.layer[0].crossattention
    if encoder:
        assert torch.equal(model.text.encoder.layer[0].attention.self.query.weight,
                           state["text_encoder.encoder.layer.0.attention.self.query.weight"])
        assert_queue(model, q)
        check_itc_by_hand(model, state, "text_encoder.", vocab)
    if kind == "caption":
        assert torch.equal(model.text.encoder.layer[0].crossattention.self.key.weight,
                           state["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"])


def assert_original_pipeline(parts) -> None:
    """The release's own evaluation transform: torchvision's bicubic Resize((S, S)) of the PIL image."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from vlzoo.zoo import ZooModel

    vision = parts.config.vision
    assert parts.pipeline.kind == "original" and parts.pipeline.settings["size"] == vision.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 71, 3), dtype=np.uint8))
    reference = transforms.Compose([
        transforms.Resize((vision.image_size,) * 2, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(vision.mean, vision.std)])
    assert torch.equal(ZooModel(parts).preprocess(image), reference(image))


def test_blip_decoder_copy_differs(tmp_path, vocab):
    """A file whose decoder copy of a shared tensor differs: the encoder's is kept, no generate."""
    state = random_state(blip_keys(True, True), vocab)  # independent random copies: all differ
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_encoder.embeddings.word_embeddings.weight"]
    parts = load_original_entry(entry(tmp_path, "blip"), save(tmp_path, {**state, **queues(ids=False)}))
    assert parts.capabilities == {"encode", "itm"}
    assert any("differ from text_encoder's" in n for n in parts.extra["notes"])
    assert torch.equal(parts.model.text.encoder.layer[0].output.dense.weight,
                       state["text_encoder.encoder.layer.0.output.dense.weight"])


def test_pickled_object_refused(tmp_path, vocab):
    state = random_state(albef_keys(pretrain=False), vocab)
    path = save(tmp_path, state, args=argparse.Namespace(lr=1e-5))
    with pytest.raises(ValueError, match="refused"):
        load_original_entry(entry(tmp_path, "albef"), path)


def test_missing_or_extra_key_is_named(tmp_path, vocab):
    state = random_state(albef_keys(pretrain=False), vocab)
    missing = {k: v for k, v in state.items() if k != "visual_encoder.blocks.0.mlp.fc1.bias"}
    with pytest.raises(CheckpointKeyError, match=r"vision\.model\.blocks\.0\.mlp\.fc1\.bias"):
        load_original_entry(entry(tmp_path, "albef"), save(tmp_path, missing))
    extra = {**state, "visual_encoder.head.weight": torch.zeros(10, DV)}
    with pytest.raises(KeyError, match=r"visual_encoder\.head\.weight"):
        load_original_entry(entry(tmp_path, "albef"), save(tmp_path, extra))
