"""``vlzoo export --to hf``: vlzoo BLIP / BLIP-2 -> transformers, proven by round trips
(transformers -> vlzoo -> transformers is bit exact) and by parity of a vlzoo-built
model with its export reloaded by ``from_pretrained`` (fp32, eval mode, tiny sizes)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tiny_configs import save_task_checkpoint, tiny_blip2_config, tiny_task  # noqa: E402

from vlzoo.cli import main  # noqa: E402
from vlzoo.data.llm_text import shapes_lm_tokenizer  # noqa: E402
from vlzoo.hub.convert import LoadedParts  # noqa: E402
from vlzoo.hub.convert.hf_blip import (  # noqa: E402
    CAPTIONING,
    RETRIEVAL,
    VQA,
    blip_config_from_hf,
    load_hf_blip,
    to_hf_blip,
)
from vlzoo.hub.convert.hf_blip2 import load_hf_blip2, to_hf_blip2  # noqa: E402
from vlzoo.hub.export import export_to_hf  # noqa: E402
from vlzoo.hub.loaders import load_parts  # noqa: E402
from vlzoo.models.builders import BlipTokenIds, build_blip2_retrieval, build_blip_from_hf  # noqa: E402
from vlzoo.models.generation import GenerationConfig  # noqa: E402

ATOL = 1e-5
PAD, SEP, DEC, VOCAB = 0, 3, 62, 64
QUERIES, LLM_VOCAB = 4, 96
BLIP2_VISION = dict(hidden_size=28, intermediate_size=61, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=100,
               max_position_embeddings=24, cross_attention_frequency=1)
OPT = dict(model_type="opt", vocab_size=LLM_VOCAB, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1,
           ffn_dim=64, num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=2,
           pad_token_id=1)
T5 = dict(model_type="t5", vocab_size=LLM_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
          decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)


def _perturbed(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter moved off its (often zero or one) initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model.eval()


def _assert_same_state(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    a, b = ours.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _texts(first: int, vocab: int, low: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texts (B=2, L=6), ``first`` first, the second right-padded by 2."""
    ids = torch.randint(low, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = first
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0
    return ids, mask


# ------------------------------------------------------------ round trips, bit exact
def _hf_blip(architecture: str):
    vision = 32 if architecture == VQA else 48  # transformers' VQA needs equal vision and text widths
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=DEC, sep_token_id=SEP, pad_token_id=PAD, eos_token_id=SEP)
    config = transformers.BlipConfig(text_config=text, image_text_hidden_size=16, vision_config=dict(
        hidden_size=vision, intermediate_size=2 * vision, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8))
    return _perturbed(getattr(transformers, architecture)(config))


@pytest.mark.parametrize("architecture", [RETRIEVAL, CAPTIONING, VQA])
def test_blip_round_trip_is_bit_exact(architecture, tmp_path):
    hf = _hf_blip(architecture)
    hf.save_pretrained(tmp_path / "hf")
    parts = load_hf_blip(tmp_path / "hf", json.loads((tmp_path / "hf" / "config.json").read_text()))
    export_to_hf(parts, tmp_path / "back")
    back = getattr(transformers, architecture).from_pretrained(tmp_path / "back")
    _assert_same_state(back, hf)
    assert back.config.text_config.bos_token_id == DEC and back.config.text_config.sep_token_id == SEP


def _hf_blip2(architecture: str, llm: dict | None = None):
    qformer = dict(QFORMER, use_qformer_text_input=architecture == "Blip2ForImageTextRetrieval")
    config = transformers.Blip2Config(vision_config=BLIP2_VISION, qformer_config=qformer, text_config=llm or OPT,
                                      num_query_tokens=QUERIES, image_text_hidden_size=16,
                                      image_token_index=None if llm is None else LLM_VOCAB - 1)
    return _perturbed(getattr(transformers, architecture)(config), std=0.1 if llm is None else 0.5)


def _blip2_parts(hf, directory: Path):
    hf.save_pretrained(directory)
    return load_hf_blip2(directory, json.loads((directory / "config.json").read_text()))


@pytest.mark.parametrize("llm", [None, OPT, T5], ids=["retrieval", "opt", "t5"])
def test_blip2_round_trip_is_bit_exact(llm, tmp_path):
    architecture = "Blip2ForImageTextRetrieval" if llm is None else "Blip2ForConditionalGeneration"
    hf = _hf_blip2(architecture, llm)
    parts = _blip2_parts(hf, tmp_path)
    index = None if llm is None else LLM_VOCAB - 1
    back = to_hf_blip2(parts, image_token_index=index)
    assert type(back).__name__ == architecture and back.config.image_token_index == index
    _assert_same_state(back, hf)


# ------------------------------------------------------- vlzoo-built models, parity
@pytest.fixture(scope="module")
def blip_checkpoint(tmp_path_factory):
    """A BLIP as ``vlzoo fit`` saves it (shapes tokenizer, token-type embeddings, timm
    LayerNorm epsilon 1e-6), every weight perturbed."""
    torch.manual_seed(0)
    task = tiny_task("blip")
    _perturbed(task.model)
    return save_task_checkpoint(task, tmp_path_factory.mktemp("blip") / "blip.ckpt")


@torch.no_grad()
def test_vlzoo_blip_exported_by_the_cli_matches(blip_checkpoint, tmp_path):
    assert main(["export", str(blip_checkpoint), "--out", str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    model = load_parts(blip_checkpoint).model
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ids, mask = _texts(first=2, vocab=model.text.config.vocab_size, low=7)
    enc_ids = ids.clone()
    enc_ids[:, 0] = model.enc_id  # transformers feeds the ids as given; vlzoo puts [ENC] first
    hf_itm = hf(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    hf_image = F.normalize(hf.vision_proj(hf.vision_model(pixel_values=pixels).last_hidden_state[:, 0]), dim=-1)
    hf_text = F.normalize(hf.text_proj(hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]),
                          dim=-1)
    diffs = {"itm": _max_diff(model.itm_score(pixels, ids, mask), hf_itm.softmax(-1)[:, 1]),
             "image": _max_diff(model.encode_image(pixels), hf_image),
             "text": _max_diff(model.encode_text(ids, mask), hf_text)}
    print("BLIP retrieval export max abs diffs", diffs)
    assert max(diffs.values()) <= ATOL, diffs


@torch.no_grad()
def test_vlzoo_blip_captioning_head_matches(blip_checkpoint, tmp_path):
    parts = load_parts(blip_checkpoint)
    to_hf_blip(parts, head="captioning").save_pretrained(tmp_path)
    hf = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    model = parts.model
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ids, mask = _texts(first=model.dec_id, vocab=model.text.config.vocab_size, low=7)
    ours = model.decoder_logits(ids, mask, model.vision(pixels).tokens)
    diff = _max_diff(ours, hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits)
    print(f"BLIP captioning export LM logits max abs diff {diff:.2e}")
    assert diff <= ATOL
    assert hf.config.text_config.bos_token_id == model.dec_id and hf.config.text_config.sep_token_id == model.eos_id


def _vlzoo_blip2(norm_eps: float | None):
    """A stage-1 BLIP-2 as vlzoo builds it: timm tower read at its penultimate block
    (its last block and final norm unused), Q-Former with token types."""
    cfg = tiny_blip2_config()
    if norm_eps is not None:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, kwargs={**cfg.vision.kwargs,
                                                                                      "norm_eps": norm_eps}))
    model = _perturbed(build_blip2_retrieval(cfg))
    return LoadedParts("blip2", model, cfg, cfg.vision, None, frozenset({"encode", "itm", "generate"}))


@torch.no_grad()
def test_vlzoo_blip2_stage1_matches(tmp_path):
    parts = _vlzoo_blip2(norm_eps=1e-5)
    to_hf_blip2(parts).save_pretrained(tmp_path)
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    assert hf.config.vision_config.num_hidden_layers == 1  # the block vlzoo never ran is left out
    model = parts.model
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ids, mask = _texts(first=2, vocab=model.qformer.config.vocab_size)
    itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    diffs = {"image": _max_diff(model.encode_image(pixels), itc.image_embeds),
             "text": _max_diff(model.encode_text(ids, mask), itc.text_embeds),
             "itm": _max_diff(model.itm_score(pixels, ids, mask), itm.logits_per_image.softmax(-1)[:, 1])}
    print("BLIP-2 stage-1 export max abs diffs", diffs)
    assert max(diffs.values()) <= ATOL, diffs


@torch.no_grad()
def test_blip2_stage2_without_placeholder_grows_the_vocabulary(tmp_path):
    parts = _blip2_parts(_hf_blip2("Blip2ForConditionalGeneration", OPT), tmp_path / "hf")
    to_hf_blip2(parts).save_pretrained(tmp_path / "out")  # the directory has no tokenizer: a new row
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert hf.config.image_token_index == LLM_VOCAB and hf.config.text_config.vocab_size == LLM_VOCAB + 1
    assert hf.generation_config.suppress_tokens == [LLM_VOCAB]
    model = parts.model
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompt = torch.randint(3, LLM_VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(prompt)
    hf_ids = torch.cat([torch.full((2, QUERIES), LLM_VOCAB), prompt], dim=1)
    hf_mask = torch.ones_like(hf_ids)
    soft = model.soft_prompt(model.image_tokens(pixels))
    embeds, full_mask = model._with_soft_prompt(soft, prompt, mask)
    ours = model.llm(inputs_embeds=embeds, attention_mask=full_mask).logits
    theirs = hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask).logits
    diff = _max_diff(ours, theirs[..., :LLM_VOCAB])
    print(f"BLIP-2 stage-2 (OPT) export logits max abs diff {diff:.2e}")
    assert diff <= ATOL
    greedy = GenerationConfig(method="greedy", max_length=5, min_length=5)
    hf_new = hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                         num_beams=1, max_new_tokens=5, min_new_tokens=5)[:, hf_ids.shape[1]:]
    assert torch.equal(model.generate(soft, prompt, mask, greedy), hf_new)

    # with an LLM tokenizer lacking <image>, the first row past its vocabulary (no growth)
    tokenizer = shapes_lm_tokenizer()
    spare = to_hf_blip2(dataclasses.replace(parts, extra={**parts.extra, "llm_tokenizer": tokenizer}))
    assert spare.config.image_token_index == len(tokenizer) < LLM_VOCAB == spare.config.text_config.vocab_size


# --------------------------------------------------------------------------- errors
def _vlzoo_blip(**vision_kwargs) -> LoadedParts:
    cfg = blip_config_from_hf(json.loads(_hf_blip(RETRIEVAL).config.to_json_string()))
    vision = dataclasses.replace(cfg.vision, **vision_kwargs)
    cfg = dataclasses.replace(cfg, vision=vision)
    model = build_blip_from_hf(cfg, BlipTokenIds(enc=DEC + 1, dec=DEC, pad=PAD, eos=SEP))
    return LoadedParts("blip", model.eval(), cfg, cfg.vision, None, frozenset({"encode", "itm"}))


def test_what_transformers_cannot_express_is_named():
    base = _vlzoo_blip().config.vision.kwargs
    with pytest.raises(ValueError, match="layer scale"):
        to_hf_blip(_vlzoo_blip(kwargs={**base, "init_values": 1e-5}))
    with pytest.raises(ValueError, match="Eva tower cannot be expressed"):
        to_hf_blip(_vlzoo_blip(name="eva02_tiny_patch14_224", kwargs={**base, "depth": 1}))
    with pytest.raises(ValueError, match="stops after block 1 of 2"):  # BLIP reads the last block, normed
        to_hf_blip(_vlzoo_blip(output_layer=-2, kwargs={**base, "depth": 2}))
    with pytest.raises(ValueError, match="'generate'"):
        to_hf_blip(_vlzoo_blip(), head="captioning")  # a retrieval model's decoder was never trained
    with pytest.raises(ValueError, match="ln_vision's epsilon 1e-05.*1e-06"):
        to_hf_blip2(_vlzoo_blip2(norm_eps=None))  # timm's 1e-6 in the tower, 1e-5 in ln_vision
    with pytest.raises(ValueError, match="no clip class"):
        export_to_hf(dataclasses.replace(_vlzoo_blip(), family="clip"), "unused")


def test_stage2_export_saves_the_llm_tokenizer_with_its_image_placeholder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<s>", "<unk>", "question", ":", "answer", "a", "photo", "of"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                         bos_token="<s>", unk_token="<unk>").save_pretrained(tmp_path / "src")
    parts = _blip2_parts(_hf_blip2("Blip2ForConditionalGeneration", OPT), tmp_path / "src")
    assert parts.extra["llm_tokenizer"] is not None
    export_to_hf(parts, tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index == len(words)
    assert "<image>" not in parts.extra["llm_tokenizer"].get_vocab()  # the model's own tokenizer is untouched
