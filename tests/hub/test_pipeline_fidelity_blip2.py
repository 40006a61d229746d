"""``vlzoo.load`` of a transformers BLIP-2 stage-2 directory against transformers' own
pipeline, from PIL images and strings to generated text.

Each reference is a tiny random ``Blip2ForConditionalGeneration`` with the preprocessing and
tokenizer configuration of the published checkpoint it stands for:

- ``Salesforce/blip2-opt-2.7b``: BlipImageProcessor 224 x 224 squash, bicubic, OpenAI CLIP
  mean/std, ``do_convert_rgb``; OPT's byte-level BPE (``GPT2Tokenizer``) with ``<s>`` 0,
  ``<pad>`` 1, ``</s>`` 2 (BOS = EOS, prepended to every text), ``<unk>`` 3, padding on the
  left;
- ``Salesforce/blip2-flan-t5-xl``: the same image processor; a T5 unigram tokenizer with
  ``<pad>`` 0, ``</s>`` 1 (appended as EOS), ``<unk>`` 2, no BOS, padding on the right.

Both processors carry transformers 5's ``<image>`` token and ``num_query_tokens``: the
processor puts ``num_query_tokens`` ``<image>`` ids in front of each (padded) text and the
model replaces their embeddings with the projected queries. Captions use LAVIS's prompt
("a photo of"), answers "Question: {} Answer:".
"""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_fidelity import OPENAI_MEAN, OPENAI_STD, _photo

import vlzoo
from vlzoo.hub.convert.hf_blip2 import CAPTION_PROMPT, VQA_PROMPT

QUERIES = 4
CORPUS = ("a photo of a dog on the sofa . question : what is in the picture ? answer : two cats sleeping "
          "there is a red car and a blue bus near the old house , how many people are walking in the park ; "
          "is it raining today ! where are the children playing with the ball").split()
QUESTIONS = ["What is this?", "How many DOGS are there, in total... (roughly)?", "Is it red; or BLUE?!",
             "Where? " + " ".join(["And what is near the OLD house in the park, really?"] * 6)]  # over-long
PROMPT = "A PICTURE of: my Dog,"
GENERATION = [dict(num_beams=1, max_new_tokens=8, min_new_tokens=0),
              dict(num_beams=3, max_new_tokens=12, min_new_tokens=5),
              dict(num_beams=3, max_new_tokens=10, min_new_tokens=2, repetition_penalty=1.5, length_penalty=0.7),
              dict(num_beams=4, max_new_tokens=12, min_new_tokens=1, length_penalty=2.0, early_stopping=True)]
SETTING_IDS = ["greedy", "beam", "beam_penalties", "beam_early_stopping"]


# ------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """A 640 x 427 photo, a grayscale image, an RGBA image, one smaller than 224 x 224."""
    photo = Image.fromarray(_photo(640, 427))
    rgba = Image.fromarray(np.dstack([_photo(333, 251, 4), _photo(333, 251, 5)[..., 0]]), "RGBA")
    return [photo, Image.fromarray(_photo(301, 224, 1)).convert("L"), rgba, Image.fromarray(_photo(13, 9, 3))]


# --------------------------------------------------------------------- tokenizers
def _opt_tokenizer():
    """OPT's tokenizer configuration (facebook/opt-*, as in blip2-opt-2.7b) on a byte-level
    BPE trained here: ``GPT2Tokenizer`` with ``add_bos_token``, BOS = EOS = ``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(CORPUS)] * 4, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(backend.to_str())["model"]["merges"]]
    tok = GPT2Tokenizer(vocab=backend.get_vocab(), merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                        pad_token="<pad>", add_bos_token=True, padding_side="left")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 2, 3)
    return tok


def _t5_tokenizer():
    """Flan-T5's tokenizer configuration (``T5Tokenizer``: a sentencepiece unigram model,
    ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2, no BOS) on a small unigram vocabulary
    written here (unigram training is not deterministic): the corpus's words, a few
    subwords and single characters; other characters are ``<unk>``."""
    from transformers import T5Tokenizer

    words = sorted({w.strip(",.;!?:") for w in CORPUS} - {""})
    pieces = [("\u2581", -2.0)] + [(f"\u2581{w}", -4.0) for w in words]
    pieces += [(p, -6.0) for p in ("ing", "ed", "es", "s", "er", "re", "th", "an", "on", "in")]
    pieces += [(c, -8.0) for c in sorted(set(string.ascii_letters + string.digits + ".,;:!?'()-"))]
    tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces], extra_ids=0)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
    return tok


# ------------------------------------------------------------------------- models
def _blip2_directory(kind: str, directory):
    """A tiny random Blip2ForConditionalGeneration (OPT or T5) and its Blip2Processor saved to
    ``directory``; returns (model, processor reloaded from the directory)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    image_processor = BlipImageProcessor(size={"height": 224, "width": 224}, resample=3, image_mean=OPENAI_MEAN,
                                         image_std=OPENAI_STD, do_convert_rgb=True)
    tokenizer = _opt_tokenizer() if kind == "opt" else _t5_tokenizer()
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=QUERIES)  # adds <image>
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vocab = (len(tokenizer) + 7) // 8 * 8 + 8  # spare rows past <image>, as OPT's 50272
    if kind == "opt":
        text = dict(model_type="opt", vocab_size=vocab, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                    ffn_dim=64, num_attention_heads=2, max_position_embeddings=512, dropout=0.0,
                    attention_dropout=0.0, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    else:
        text = dict(model_type="t5", vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                    dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=32, cross_attention_frequency=1),
        text_config=text, num_query_tokens=QUERIES, image_token_index=image_token)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    _diverse(model)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, Blip2Processor.from_pretrained(directory)


@torch.no_grad()
def _diverse(model) -> None:
    """Decoding that tells pipelines apart: large random weights everywhere (transformers
    zero-inits biases and the queries; small weights give one repeated token whatever the
    image), and an EOS that competes, so rows end at different lengths and ``min_new_tokens``,
    the length penalty and a penalty on prompt tokens (EOS is OPT's BOS) change the outcome."""
    is_t5 = model.config.text_config.model_type == "t5"
    for p in model.parameters():
        p.add_(torch.randn_like(p) * (1.0 if is_t5 else 0.5))
    head, eos = model.get_output_embeddings().weight, model.config.text_config.eos_token_id
    if is_t5:  # untied head: a longer EOS row
        head[eos].mul_(2.0)
    else:  # tied head: the final LayerNorm's bias adds about 11 to the EOS logit
        model.language_model.model.decoder.final_layer_norm.bias.add_(11.0 * head[eos] / head[eos].norm() ** 2)


@pytest.fixture(scope="module", params=["opt", "t5"])
def blip2(request, tmp_path_factory):
    """(transformers model, its processor, ``vlzoo.load`` of the same directory)."""
    directory = tmp_path_factory.mktemp(f"blip2_{request.param}")
    ref, processor = _blip2_directory(request.param, directory)
    return ref, processor, vlzoo.load(directory)


def _reference_text(ref, processor, images, texts, settings) -> list[str]:
    """transformers' pipeline: processor -> generate -> the new tokens decoded."""
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    out = ref.generate(**batch, do_sample=False, **settings)
    # decoder-only: the prompt (with its <image> placeholders) comes back first; T5: the decoder start
    new = out[:, batch["input_ids"].shape[1]:] if ref.config.use_decoder_only_language_model else out[:, 1:]
    texts = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    assert len(set(texts)) > 1, texts  # text that depends on the image: the comparison means something
    return texts


def _vqa_settings(settings: dict) -> dict:
    """vlzoo's ``method`` picks the search (``num_beams`` counts the beams of ``beam``); captions
    default to ``beam`` (one beam: transformers' greedy search), answers to ``greedy``."""
    return {**settings, "method": "beam" if settings["num_beams"] > 1 else "greedy"}


# -------------------------------------------------------------------------- tests
@torch.no_grad()
def test_pixels_and_prompt_ids_are_the_processors(blip2, images):
    """Pixels within one 8-bit level; the LLM prompt ids and mask (BOS, padding side, EOS, no
    truncation of the over-long question) are the processor's after its ``<image>`` ids."""
    ref, processor, zoo = blip2
    assert zoo.family == "blip2_llm" and zoo.pipeline.kind == "transformers"
    ours = zoo.pixel_values(images)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    diff = (ours - expected).abs().max().item()
    assert diff <= 1.0 / 255.0 / min(OPENAI_STD) + 1e-6, f"pixels differ by {diff:.4f}"

    from vlzoo.models.blip2 import llm_prompt_batch

    prompts = [VQA_PROMPT.format(q) for q in QUESTIONS]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    llm_tokenizer = zoo.extra["llm_tokenizer"]
    ours = llm_prompt_batch(zoo.model, llm_tokenizer, prompts, zoo.config.max_text_length)
    image_ids = batch["input_ids"][:, :QUERIES]  # the processor's <image> placeholders come first
    assert (image_ids == ref.config.image_token_index).all()
    expected_ids, expected_mask = batch["input_ids"][:, QUERIES:], batch["attention_mask"][:, QUERIES:]
    assert torch.equal(ours["input_ids"], expected_ids) and torch.equal(ours["attention_mask"], expected_mask)


@pytest.mark.parametrize("settings", GENERATION, ids=SETTING_IDS)
@torch.no_grad()
def test_captions_are_transformers(blip2, images, settings):
    ref, processor, zoo = blip2
    expected = _reference_text(ref, processor, images, [CAPTION_PROMPT] * len(images), settings)
    assert zoo.generate(images, **settings) == expected, settings


@pytest.mark.parametrize("settings", GENERATION[:2], ids=SETTING_IDS[:2])
@torch.no_grad()
def test_text_after_a_prompt_is_transformers(blip2, images, settings):
    ref, processor, zoo = blip2
    expected = _reference_text(ref, processor, images, [PROMPT] * len(images), settings)
    assert zoo.generate(images, prompt=PROMPT, **settings) == expected, settings


@pytest.mark.parametrize("settings", GENERATION, ids=SETTING_IDS)
@torch.no_grad()
def test_answers_are_transformers(blip2, images, settings):
    """Questions of different lengths in one batch: OPT's prompts are left-padded."""
    ref, processor, zoo = blip2
    expected = _reference_text(ref, processor, images, [VQA_PROMPT.format(q) for q in QUESTIONS], settings)
    assert zoo.vqa(images, QUESTIONS, **_vqa_settings(settings)) == expected, settings
