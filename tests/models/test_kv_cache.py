"""Decoding with a key/value cache (``GenerationConfig.use_cache``): every decoder vlzoo
owns (BLIP's captioner, BLIP VQA's answer decoder, the Q-Former's ITG) gives the tokens and
logits of re-running the whole sequence each step, with far fewer FLOPs."""

import copy

import pytest
import torch
from tiny_configs import tiny_blip2_config, tiny_momentum_config

from vlzoo.budget import flop_counter_with_attention
from vlzoo.config import BLIPConfig
from vlzoo.layers.transformer import (
    BertConfig,
    DecodeCache,
    TransformerStack,
    causal_mask,
    decode_mask,
)
from vlzoo.models.builders import build_blip, build_blip2, build_blip_vqa_model
from vlzoo.models.generation import CachedNextLogits, GenerationConfig

PEAKED = 0.3  # a wider init than BERT's 0.02: random decoders with peaked logits, so float
# rounding cannot flip a near-tie between the cached and the re-run decode


def _peaked(cfg):
    cfg = copy.deepcopy(cfg)
    text = cfg.qformer if hasattr(cfg, "qformer") else cfg.text
    text.kwargs = {**text.kwargs, "initializer_range": PEAKED, "hidden_dropout_prob": 0.0,
                   "attention_probs_dropout_prob": 0.0}
    return cfg


def _blip():
    torch.manual_seed(0)
    model, _ = build_blip(_peaked(tiny_momentum_config(BLIPConfig)))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = model.image_tokens_and_feat(images)[0]
    return lambda config: model.generate_from_tokens(tokens, config=config)


def _blip2():
    torch.manual_seed(0)
    model, _ = build_blip2(_peaked(tiny_blip2_config()))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = model.image_tokens(images)
    return lambda config: model.generate_from_tokens(tokens, config=config)


def _blip_vqa():
    torch.manual_seed(0)
    model, tokenizer, _ = build_blip_vqa_model(_peaked(tiny_momentum_config(BLIPConfig)))
    model.eval()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    questions = tokenizer(["what shape is red", "how many circles", "is there a star left of the square"])
    tokens = model.vision(images).tokens
    return lambda config: model.answer_from_tokens(tokens, questions["input_ids"], questions["attention_mask"],
                                                   config)


DECODERS = {"blip": _blip, "blip2": _blip2, "blip_vqa": _blip_vqa}
SETTINGS = [dict(method="greedy", max_length=8, min_length=1),
            dict(method="greedy", max_length=8, min_length=8),
            dict(method="beam", num_beams=3, max_length=8, min_length=2),
            dict(method="beam", num_beams=2, max_length=7, min_length=1, early_stopping=True, length_penalty=0.5),
            dict(method="beam", num_beams=3, max_length=6, min_length=1, repetition_penalty=1.5)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("decoder", DECODERS)
def test_cached_decoding_gives_the_tokens_of_rerunning_the_sequence(decoder, setting):
    decode = DECODERS[decoder]()
    with flop_counter_with_attention() as full_flops:  # attention counted on CPU too
        full = decode(GenerationConfig(**setting, use_cache=False))
    with flop_counter_with_attention() as cached_flops:
        cached = decode(GenerationConfig(**setting, use_cache=True))
    assert full.shape[1] >= 2, "the decode must run past its first step to exercise the cache"
    torch.testing.assert_close(cached, full, rtol=0, atol=0)
    assert cached_flops.get_total_flops() < full_flops.get_total_flops()


def test_nucleus_sampling_with_the_cache_draws_the_same_tokens():
    decode = _blip()
    setting = dict(method="nucleus", top_p=0.9, max_length=8, min_length=1)
    draws = [decode(GenerationConfig(**setting, use_cache=cache)) for cache in (False, True)
             for _ in [torch.manual_seed(3)]]
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)


def test_a_stack_decoded_token_by_token_equals_the_causal_pass():
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    stack = TransformerStack(cfg, cross_attention_width=24, cross_attention_layers=(0, 2)).eval()
    x, image = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    full = stack(x, causal_mask(7), image)
    cache = DecodeCache(3)
    parts = [stack(x[:, :3], decode_mask(3, 0), image, cache=cache)]  # a prefix, then one token at a time
    for t in range(3, 7):
        parts.append(stack(x[:, t:t + 1], decode_mask(1, t), image, cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.blocks[0][1].key.shape == (2, 4, 5, 8)  # cross-attention keys: projected once


def test_select_reorders_every_cached_sequence():
    steps = []

    def step(new, rows, cache, seen):
        steps.append((new.clone(), rows.clone(), seen))
        return torch.zeros(len(new), new.shape[1], 4)

    logits = CachedNextLogits(step, layers=1)
    logits(torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1]))
    cache = logits.cache.blocks[0][0]
    cache.key, cache.value = torch.tensor([[10.0], [20.0]]), torch.tensor([[1.0], [2.0]])
    logits.select(torch.tensor([1, 1, 0]))
    logits(torch.tensor([[3, 4, 5], [3, 4, 6], [1, 2, 7]]), torch.tensor([1, 1, 0]))
    assert cache.key.tolist() == [[20.0], [20.0], [10.0]] and cache.value.tolist() == [[2.0], [2.0], [1.0]]
    assert steps[1][0].tolist() == [[5], [6], [7]] and steps[1][2] == 2  # only the new token, after 2 seen
