"""Prompt + target batches for an LLM: labels, padding, BOS/EOS handling; VQA scoring."""

import torch

from vlzoo.data.llm_text import (
    causal_lm_batch,
    left_padded_prompts,
    seq2seq_batch,
    shapes_lm_tokenizer,
)
from vlzoo.eval.vqa import majority_accuracy, normalize_answer, vqa_accuracy
from vlzoo.losses import IGNORE


def test_shapes_lm_tokenizer_bos_is_optional():
    with_bos, without = shapes_lm_tokenizer(), shapes_lm_tokenizer(add_bos=False)
    ids = with_bos("a red circle")["input_ids"]
    assert ids[0] == with_bos.bos_token_id and ids[1:] == without("a red circle")["input_ids"]
    assert with_bos.eos_token_id not in ids


def test_causal_batch_labels_only_the_target_and_eos():
    tok = shapes_lm_tokenizer(add_bos=False)
    batch = causal_lm_batch(tok, ["Question: how many shapes are there? Answer:", ""], ["two", "a red circle"], 64)
    prompt = tok("Question: how many shapes are there? Answer:")["input_ids"]
    row = batch["labels"][0]
    assert (row[: len(prompt)] == IGNORE).all()
    assert row[len(prompt) : len(prompt) + 2].tolist() == [tok.convert_tokens_to_ids("two"), tok.eos_token_id]
    assert (row[len(prompt) + 2 :] == IGNORE).all()
    caption = tok("a red circle")["input_ids"] + [tok.eos_token_id]
    assert batch["labels"][1, : len(caption)].tolist() == caption  # no prompt: every token is a label
    assert batch["attention_mask"][1].sum() == len(caption)


def test_truncation_and_padding_sides():
    tok = shapes_lm_tokenizer()
    batch = causal_lm_batch(tok, ["a picture of"], ["a red circle left of a blue square"], 6)
    assert batch["input_ids"].shape == (1, 6)
    left = left_padded_prompts(tok, ["a", "a picture of"], 16)
    assert left["attention_mask"][0].tolist()[0] == 0 and left["attention_mask"][0, -1] == 1
    assert left["input_ids"][0, -1] == tok.convert_tokens_to_ids("a")
    enc = seq2seq_batch(tok, ["Question: what shape? Answer:"], ["star"], 32)
    assert enc["labels"][0].tolist()[:2] == [tok.convert_tokens_to_ids("star"), tok.eos_token_id]
    assert torch.equal(enc["attention_mask"].bool(), enc["input_ids"] != tok.pad_token_id)


def test_vqa_accuracy_normalises_and_majority_baseline():
    assert normalize_answer("The Red.") == "red"
    assert vqa_accuracy(["Red", "a star", "two"], ["red", "star", "three"]) == 2 / 3
    qa = [{"type": "count", "answer": "two"}, {"type": "count", "answer": "one"}, {"type": "exists", "answer": "no"}]
    assert majority_accuracy(qa, {"count": "two", "exists": "yes"}) == 1 / 3
