"""BLIP-2 stage 1 (losses, frozen encoder, ITC by max over queries, Q-Former captions)
and stage 2 with random OPT and T5 models from transformers."""

import pytest
import torch
from tiny_configs import tiny_blip2_config as tiny_config

from vlzoo.data.llm_text import (
    causal_lm_batch,
    left_padded_prompts,
    seq2seq_batch,
    shapes_lm_tokenizer,
)
from vlzoo.models.blip2 import BLIP2LLM, max_query_similarity
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks.blip2 import build_resolved_blip2


def batch(tokenizer, n: int = 4):
    texts = ["a red circle", "a small blue square left of a star", "a green cross", "a purple diamond above a star"]
    tokens = tokenizer(texts[:n])
    return torch.randn(n, 3, 16, 16), tokens["input_ids"], tokens["attention_mask"], torch.arange(n)


def test_max_query_similarity():
    queries, texts = torch.randn(2, 3, 5), torch.randn(4, 5)
    expected = torch.stack([torch.stack([(queries[b] @ texts[t]).max() for t in range(4)]) for b in range(2)])
    torch.testing.assert_close(max_query_similarity(queries, texts), expected)


def test_stage1_losses_train_everything_but_the_frozen_encoder():
    torch.manual_seed(0)
    model, tok, _ = build_resolved_blip2(tiny_config())
    model.train()
    assert not model.vision.training  # stays in eval mode
    out = model(*batch(tok))
    assert set(out.losses) == {"itc", "itm", "itg"} and all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())
    assert model.qformer.query_tokens.grad is not None and model.ln_vision.weight.grad is not None


def test_itc_is_cross_entropy_over_max_query_similarity():
    torch.manual_seed(0)
    model, _, _ = build_resolved_blip2(tiny_config())
    queries = torch.nn.functional.normalize(torch.randn(3, 4, 16), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    loss, sim_t2i, sim_i2t = model.itc(queries, texts, torch.arange(3))
    logits = max_query_similarity(queries, texts) / model.temp
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(3))
                + torch.nn.functional.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(sim_i2t, logits)
    torch.testing.assert_close(sim_t2i, logits.T)


def _eval_model_and_pairs():
    """A tiny BLIP-2 in eval mode, two captions (ids, mask) and their images' tokens."""
    torch.manual_seed(0)
    model, tok, _ = build_resolved_blip2(tiny_config())
    model.eval()
    images, ids, mask, _ = batch(tok, 2)
    return model, ids, mask, model.image_tokens(images)


def test_itm_score_is_the_mean_over_queries():
    model, ids, mask, tokens = _eval_model_and_pairs()
    queries = model.qformer(tokens, ids, mask, "bidirectional").queries
    torch.testing.assert_close(model.itm_logits(ids, mask, tokens), model.itm_head(queries).mean(1))


def test_frozen_encoder_in_bf16_and_qformer_in_fp32():
    torch.manual_seed(0)
    model, tok, _ = build_resolved_blip2(tiny_config(frozen_precision="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in model.vision.parameters())
    assert all(p.dtype == torch.float32 for p in model.qformer.parameters())
    assert model.image_tokens(batch(tok)[0]).dtype == torch.float32
    with pytest.raises(ValueError, match="frozen precision"):
        build_resolved_blip2(tiny_config(frozen_precision="int4"))


def test_under_bf16_autocast_the_qformer_runs_in_fp32():
    model, ids, mask, tokens = _eval_model_and_pairs()
    fp32 = model.qformer(tokens, ids, mask, "bidirectional")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.qformer(tokens.bfloat16(), ids, mask, "bidirectional")
        assert model.itm_head(mixed.queries).dtype == torch.bfloat16  # what follows it still autocasts
    assert mixed.queries.dtype == mixed.text.dtype == torch.float32
    torch.testing.assert_close(mixed.queries, fp32.queries, rtol=1e-2, atol=1e-2)  # inputs rounded to bf16 only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = model.qformer(tokens, ids, mask, "bidirectional")
    torch.testing.assert_close(exact.queries, fp32.queries, rtol=0, atol=0)


def test_qformer_only_captioning_after_stage1():
    torch.manual_seed(0)
    model, tok, _ = build_resolved_blip2(tiny_config())
    model.eval()
    ids = model.generate(batch(tok, 2)[0], GenerationConfig(method="greedy", max_length=6, min_length=2))
    assert ids.shape[0] == 2 and 2 <= ids.shape[1] <= 6
    assert isinstance(tok.decode(ids[0]), str)


# ------------------------------------------------------------------------- stage 2


def _llm(kind: str):
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = shapes_lm_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=tok.bos_token_id, **ids)
        return LlamaForCausalLM(cfg), tok
    if kind == "opt":
        cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=tok.bos_token_id,
                        dropout=0.0, **ids)
        return OPTForCausalLM(cfg), tok
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=tok.pad_token_id, **ids)
    return T5ForConditionalGeneration(cfg), tok


def _stage2(kind: str):
    stage1, _, _ = build_resolved_blip2(tiny_config())
    llm, tok = _llm(kind)
    return BLIP2LLM(stage1.vision.encoder, stage1.qformer, llm), tok


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
def test_stage2_trains_only_qformer_queries_and_projection(kind):
    model, tok = _stage2(kind)
    frozen = {k: v.clone() for k, v in model.llm.state_dict().items()}
    frozen_vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    build = seq2seq_batch if kind == "t5" else causal_lm_batch
    text = build(tok, ["a photo of"] * 2, ["a red circle", "a blue star"], 32)
    images = torch.randn(2, 3, 16, 16)
    model.train()
    losses = []
    for _ in range(5):
        loss = model.lm_loss(model.soft_prompt(model.image_tokens(images)), **text)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in model.llm.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    for k, v in model.vision.state_dict().items():
        assert torch.equal(v, frozen_vision[k]), k
    held = {id(p) for p in optimizer.state}
    assert not any(id(p) in held for p in model.llm.parameters())
    assert not any(id(p) in held for p in model.vision.parameters())
    assert id(model.llm_proj.weight) in held and id(model.qformer.query_tokens) in held
    assert not model.llm.training


def test_stage2_decoder_only_labels_skip_the_soft_prompt_and_the_prompt():
    model, tok = _stage2("opt")
    text = causal_lm_batch(tok, ["Question: what colour is the star? Answer:"], ["red"], 32)
    prompt_length = len(tok("Question: what colour is the star? Answer:")["input_ids"])
    assert (text["labels"][0, :prompt_length] == -100).all()
    assert text["labels"][0, prompt_length:].tolist() == tok(" red", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    soft = model.soft_prompt(model.image_tokens(torch.randn(1, 3, 16, 16)))
    # the loss is the LLM's own over the target tokens only
    embeds = torch.cat([soft, model.llm.get_input_embeddings()(text["input_ids"])], 1)
    logits = model.llm(inputs_embeds=embeds).logits[0, soft.shape[1] + prompt_length - 1 : -1]
    expected = torch.nn.functional.cross_entropy(logits, text["labels"][0, prompt_length:])
    torch.testing.assert_close(model.lm_loss(soft, **text), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
def test_stage2_batched_generation_equals_one_by_one(kind):
    model, tok = _stage2(kind)
    model.eval()
    images = torch.randn(2, 3, 16, 16)
    soft = model.soft_prompt(model.image_tokens(images))
    prompts = ["Question: how many shapes are there? Answer:", "a photo of"]
    config = GenerationConfig(method="greedy", max_length=4, min_length=4)

    def prompt_batch(texts):
        if kind == "t5":
            b = seq2seq_batch(tok, texts, [""] * len(texts), 32)
            return b["input_ids"], b["attention_mask"]
        b = left_padded_prompts(tok, texts, 32)
        return b["input_ids"], b["attention_mask"]

    together = model.generate(soft, *prompt_batch(prompts), config)
    for i in range(2):
        alone = model.generate(soft[i : i + 1], *prompt_batch(prompts[i : i + 1]), config)
        assert together[i, : alone.shape[1]].tolist() == alone[0].tolist()


def test_stage2_soft_prompt_alone_stands_for_a_bos_less_lm_context():
    """A BOS-less LM (the shapes LM): with an empty text prompt the first target token is
    predicted from the soft prompt, and generation reads the soft prompt alone."""
    model, _ = _stage2("llama")
    tok = shapes_lm_tokenizer(add_bos=False)
    text = causal_lm_batch(tok, [""], ["a red circle"], 32)
    assert text["labels"][0].tolist() == text["input_ids"][0].tolist()  # every token is a target
    model.eval()
    soft = model.soft_prompt(model.image_tokens(torch.randn(2, 3, 16, 16)))
    prompt = left_padded_prompts(tok, ["", ""], 32)
    assert prompt["attention_mask"].sum() == 0  # only padding after the soft prompt
    config = GenerationConfig(method="greedy", max_length=4, min_length=4)
    out = model.generate(soft, prompt["input_ids"], prompt["attention_mask"], config, eos_token_id=tok.eos_token_id)
    direct = model.llm.generate(inputs_embeds=soft, attention_mask=torch.ones(soft.shape[:2], dtype=torch.long),
                                max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out.tolist() == direct.tolist()
