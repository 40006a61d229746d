"""transformers BLIP (retrieval, captioning, VQA) -> vlzoo, proven numerically on tiny
random models (fp32, eval mode)."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from vlzoo.hub.convert.hf_blip import (  # noqa: E402
    CAPTIONING,
    RETRIEVAL,
    VQA,
    blip_config_from_hf,
    convert_hf_blip_state,
    hf_blip_parts,
    load_hf_blip,
)
from vlzoo.models.generation import GenerationConfig  # noqa: E402
from vlzoo.weights import CheckpointKeyError  # noqa: E402

PAD, CLS, SEP, DEC, ENC, VOCAB = 0, 2, 3, 62, 63, 64
ATOL = 1e-5
GREEDY = GenerationConfig(method="greedy", max_length=6, min_length=0)


def hf_config(vision_width: int) -> transformers.BlipConfig:
    """Tiny transformers BLIP: 2 layers each side, 32x32 images in 8x8 patches."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=DEC, sep_token_id=SEP, pad_token_id=PAD, eos_token_id=SEP)
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


@cache
def hf_model(architecture: str):
    """A random transformers model (shared by the tests, never modified); every
    parameter (biases, norms, embeddings) perturbed. transformers' VQA answer decoder
    needs equal vision and text widths; elsewhere they differ."""
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(hf_config(32 if architecture == VQA else 48)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def config_dict(model) -> dict:
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}


def convert(model):
    return hf_blip_parts(model.state_dict(), config_dict(model))


@cache
def converted(architecture: str):
    """The in-memory conversion of :func:`hf_model` (shared, never modified)."""
    return convert(hf_model(architecture))


def texts(first: int = CLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texts (B=2, L=7): ``first`` words [SEP], the second right-padded by 2."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, DEC, (2, 7), generator=g)
    ids[:, 0] = first
    ids[0, 6], ids[1, 4] = SEP, SEP
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = PAD, 0
    return ids, mask


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ retrieval
@torch.no_grad()
def test_retrieval_itc_and_itm_match_transformers():
    hf, parts = hf_model(RETRIEVAL), converted(RETRIEVAL)
    ours, pixels = parts.model, images()
    ids, mask = texts()
    assert parts.family == "blip" and parts.capabilities == {"encode", "itm"}

    image_tokens = hf.vision_model(pixel_values=pixels).last_hidden_state
    hf_image = F.normalize(hf.vision_proj(image_tokens[:, 0]), dim=-1)
    hf_text = F.normalize(hf.text_proj(hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]),
                          dim=-1)
    assert_close(ours.encode_image(pixels), hf_image)
    assert_close(ours.encode_text(ids, mask), hf_text)
    hf_sim = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    assert_close(ours.encode_image(pixels) @ ours.encode_text(ids, mask).T, hf_sim)

    # transformers feeds the ids as given; vlzoo (as the original BLIP) puts [ENC] first.
    enc_ids, _ = texts(first=ENC)
    hf_itm = hf(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
    assert_close(ours.itm_score(pixels, ids, mask), hf_itm.softmax(-1)[:, 1])


@torch.no_grad()
def test_retrieval_momentum_copies_equal_online_weights():
    ours = converted(RETRIEVAL).model
    for online, twin in ours.momentum_pairs:
        for (name, p), p_m in zip(getattr(ours, online).named_parameters(), getattr(ours, twin).parameters(),
                                  strict=True):
            assert p.equal(p_m), f"{twin}.{name}"


# ----------------------------------------------------------------------- captioning
@torch.no_grad()
def test_captioning_logits_and_greedy_generation_match_transformers():
    hf, parts = hf_model(CAPTIONING), converted(CAPTIONING)
    ours, pixels = parts.model, images()
    ids, mask = texts(first=DEC)
    assert parts.capabilities == {"generate"} and ours.dec_id == DEC and ours.eos_id == SEP

    logits = ours.decoder_logits(ids, mask, ours.vision(pixels).tokens)
    assert_close(logits, hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits)

    hf_ids = hf.generate(pixel_values=pixels, max_new_tokens=GREEDY.max_length, num_beams=1, do_sample=False)
    prefix = torch.full((2, 1), DEC)
    assert torch.equal(ours.generate(pixels, prefix, GREEDY), hf_ids[:, 1:])


# ------------------------------------------------------------------------------ VQA
@torch.no_grad()
def test_vqa_answer_logits_and_answers_match_transformers():
    hf, parts = hf_model(VQA), converted(VQA)
    ours, pixels = parts.model, images()
    assert parts.family == "blip_vqa" and parts.capabilities == {"vqa"}
    questions, q_mask = texts()
    enc_questions, _ = texts(first=ENC)
    answers, a_mask = texts(first=DEC)

    image_tokens = hf.vision_model(pixel_values=pixels).last_hidden_state
    states = hf.text_encoder(input_ids=enc_questions, attention_mask=q_mask, encoder_hidden_states=image_tokens,
                             encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))
    # transformers' BLIP cross-attention ignores encoder_attention_mask (checked below),
    # so each answer reads its own question's real tokens only, as vlzoo's masked decoder does
    hf_logits = torch.cat([
        hf.text_decoder(input_ids=answers[i : i + 1], attention_mask=a_mask[i : i + 1],
                        encoder_hidden_states=states.last_hidden_state[i : i + 1, :n]).logits
        for i, n in enumerate(q_mask.sum(1).tolist())
    ])
    assert_close(ours.answer_logits(pixels, questions, q_mask, answers, a_mask), hf_logits)

    # transformers' generate lets the decoder read question padding: compare unpadded questions
    full = torch.ones_like(q_mask)
    hf_ids = hf.generate(input_ids=enc_questions, pixel_values=pixels, attention_mask=full,
                         max_new_tokens=GREEDY.max_length, num_beams=1, do_sample=False)
    assert torch.equal(ours.answer(pixels, questions, full, GREEDY), hf_ids[:, 1:])
    beam = GenerationConfig(method="beam", num_beams=3, max_length=6, min_length=2, length_penalty=0.8)
    hf_ids = hf.generate(input_ids=enc_questions, pixel_values=pixels, attention_mask=full, max_new_tokens=6,
                         min_new_tokens=2, num_beams=3, length_penalty=0.8, do_sample=False)
    got = ours.answer(pixels, questions, full, beam)
    assert torch.equal(got, hf_ids[:, 1 : 1 + got.shape[1]]) and (hf_ids[:, 1 + got.shape[1]:] == PAD).all()


# --------------------------------------------------------------- keys and loading
@pytest.mark.parametrize("architecture", [RETRIEVAL, CAPTIONING, VQA])
def test_absent_keys_are_exactly_what_the_checkpoint_lacks(architecture):
    hf = hf_model(architecture)
    state, absent, _ = convert_hf_blip_state(hf.state_dict(), config_dict(hf), architecture)
    model_keys = set(converted(architecture).model.state_dict())
    missing = model_keys - set(state)
    assert set(state) <= model_keys
    assert missing == {k for k in model_keys if any(a in k for a in absent)}
    assert all(any(a in k for k in missing) for a in absent)


def write_tokenizer(directory) -> None:
    """A BERT WordPiece tokenizer with the tiny vocabulary ([DEC], [ENC] last)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, DEC)] + ["[DEC]", "[ENC]"]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(directory)


@torch.no_grad()
def test_load_hf_blip_directory_equals_in_memory_conversion(tmp_path):
    hf = hf_model(CAPTIONING)
    hf.save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    loaded = load_hf_blip(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    memory = converted(CAPTIONING)
    absent = loaded.extra["absent"]
    for key, value in memory.model.state_dict().items():
        if not any(a in key for a in absent):
            assert torch.equal(loaded.model.state_dict()[key], value), key
    pixels = images()
    prefix = torch.full((2, 1), DEC)
    assert torch.equal(loaded.model.generate(pixels, prefix, GREEDY), memory.model.generate(pixels, prefix, GREEDY))
    info = loaded.tokenizer.info
    assert (info.enc_id, info.dec_id, info.pad_id, info.eos_id) == (ENC, DEC, PAD, SEP)
    assert loaded.tokenizer("w5 w6")["input_ids"].tolist() == [[CLS, 5, 6, SEP]]
    assert loaded.config.prompt == "a picture of " and loaded.model.prefix_ids == [DEC, 1, 1, 1]  # [UNK] x 3
    assert memory.config.prompt == "" and memory.model.prefix_ids == [DEC]
    assert loaded.preprocess.image_size == 32 and loaded.preprocess.interpolation == "bicubic"
    assert memory.tokenizer is None


def test_load_sharded_vqa_without_tokenizer(tmp_path):
    hf = hf_model(VQA)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_hf_blip(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    assert loaded.tokenizer is None and loaded.family == "blip_vqa"
    memory = converted(VQA).model.state_dict()
    assert all(torch.equal(v, memory[k]) for k, v in loaded.model.state_dict().items())


def test_extra_missing_and_mismatched_keys_are_named():
    hf = hf_model(RETRIEVAL)
    config = config_dict(hf)
    extra = {**hf.state_dict(), "text_encoder.pooler.dense.weight": torch.zeros(32, 32)}
    with pytest.raises(KeyError, match=r"text_encoder\.pooler\.dense\.weight"):
        hf_blip_parts(extra, config)
    missing = dict(hf.state_dict())
    del missing["text_encoder.encoder.layer.1.intermediate.dense.bias"]
    with pytest.raises(CheckpointKeyError, match=r"text\.encoder\.layer\.1\.intermediate\.dense\.bias"):
        hf_blip_parts(missing, config)
    resized = {**config, "vision_config": {**config["vision_config"], "image_size": 64}}
    with pytest.raises(ValueError, match=r"vision\.model\.pos_embed"):
        hf_blip_parts(hf.state_dict(), resized)


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="BlipModel.*BlipForConditionalGeneration"):
        convert_hf_blip_state({}, {}, "BlipModel")
    with pytest.raises(ValueError, match="BlipModel"):
        hf_blip_parts({}, {"architectures": ["BlipModel"]})


def test_config_defaults_and_sizes():
    cfg = blip_config_from_hf({"architectures": [RETRIEVAL]})  # every field at transformers' defaults
    assert cfg.vision.image_size == 384 and cfg.vision.kwargs["norm_eps"] == 1e-5
    assert cfg.vision.kwargs["num_heads"] == 12 and cfg.vision.kwargs["mlp_ratio"] == 4.0
    assert cfg.text.kwargs["num_attention_heads"] == 8 and cfg.text.kwargs["type_vocab_size"] == 0
    assert cfg.text.kwargs["vocab_size"] == 30524 and cfg.embed_dim == 256 and cfg.queue_size == 4096
    assert cfg.text.context_length == 512 and cfg.vision.interpolation == "bicubic"  # no truncation, as the processor


@pytest.mark.parametrize("architecture", [RETRIEVAL, CAPTIONING, VQA])
def test_zoo_model_from_a_directory_does_what_its_checkpoint_can(architecture, tmp_path):
    """vlzoo.load of a transformers BLIP directory: retrieval embeds and scores, the
    captioner captions, the VQA model answers; each refuses what its checkpoint lacks."""
    import vlzoo
    from vlzoo.zoo import CapabilityError

    hf_model(architecture).save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    model = vlzoo.load(tmp_path)
    pixels, words = images(), ["w5 w6 w7", "w8"]
    if architecture == RETRIEVAL:
        assert model.itm_score(pixels, words).shape == (2,) and model.similarity(pixels, words).shape == (2, 2)
        with pytest.raises(CapabilityError, match="cannot generate text"):
            model.generate(pixels)
    elif architecture == CAPTIONING:
        assert len(model.generate(pixels, method="greedy", max_length=4)) == 2
        with pytest.raises(CapabilityError, match="cannot score image-text matches"):
            model.itm_score(pixels, words)
    else:
        assert len(model.vqa(pixels, ["w5 w6", "w7"])) == 2
        with pytest.raises(CapabilityError, match="cannot embed images"):
            model.encode_image(pixels)
