"""ALBEF and BLIP models: queues, EMA, sharing, losses."""

import pytest
import torch
from host_reads import HostReads

from vlzoo.config import ALBEFConfig, BLIPConfig, TextConfig, VisionConfig
from vlzoo.models import FeatureQueue
from vlzoo.models.builders import build_albef, build_blip, prompt_prefix
from vlzoo.models.generation import GenerationConfig

B = 4


def tiny_cfg(schema, **overrides):
    return schema(
        embed_dim=16, queue_size=8,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=16,
                            kwargs=dict(patch_size=8, embed_dim=24, depth=1, num_heads=2)),
        text=TextConfig(impl="bert", tokenizer="shapes", context_length=24,
                        kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=32)),
        **overrides,
    )


def batch(tokenizer):
    g = torch.Generator().manual_seed(0)
    texts = ["a red circle", "a small blue square above a green star", "a purple cross", "two yellow circles"]
    return torch.randn(B, 3, 16, 16, generator=g), tokenizer(texts), torch.arange(B)


def test_queue_is_a_ring_of_buffers_and_checks_divisibility():
    queue = FeatureQueue(6, 2)
    assert set(dict(queue.named_buffers())) == {"image", "text", "index", "ptr"}
    for step in range(4):
        feats = torch.full((2, 2), float(step))
        queue.enqueue(feats, -feats, torch.tensor([step, step]))
    assert queue.index.tolist() == [3, 3, 1, 1, 2, 2] and int(queue.ptr) == 2
    torch.testing.assert_close(queue.text[0], torch.tensor([-3.0, -3.0]))
    with pytest.raises(ValueError, match="not divisible by the global batch 4"):
        queue.enqueue(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))



def test_enqueue_and_ema_read_nothing_back_to_the_host():
    queue = FeatureQueue(4, 2)
    model, _ = build_albef(tiny_cfg(ALBEFConfig, fusion_layers=1))
    with HostReads() as mode:
        for step in range(3):
            queue.enqueue(torch.full((2, 2), float(step)), torch.zeros(2, 2), torch.tensor([step, step]))
        model.momentum_update()
    assert mode.reads == 0
    assert queue.index.tolist() == [2, 2, 1, 1] and int(queue.ptr) == 2
    with HostReads() as mode:
        int(queue.ptr)
    assert mode.reads == 1  # the counter sees a read


@pytest.mark.parametrize("family", ["albef", "blip"])
def test_forward_is_pure_and_ema_moves_every_twin_once(family):
    torch.manual_seed(0)
    model, tok = build_albef(tiny_cfg(ALBEFConfig, fusion_layers=1)) if family == "albef" else build_blip(
        tiny_cfg(BLIPConfig))
    images, tokens, index = batch(tok)
    twins_before = {n: p.clone() for n, p in model.named_parameters() if n.split(".")[0].endswith("_m")}
    queue_before = model.queue.image.clone()
    out = model(images, tokens["input_ids"], tokens["attention_mask"], index, alpha=0.4)
    assert set(out.losses) == {"itc", "itm", "mlm" if family == "albef" else "lm"}
    out.loss.backward()
    assert all(torch.isfinite(v) for v in out.losses.values())
    # forward touched neither the momentum copies nor the queue
    for n, p in model.named_parameters():
        if n in twins_before:
            assert torch.equal(p, twins_before[n]), n
            assert p.grad is None and not p.requires_grad
    assert torch.equal(model.queue.image, queue_before)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    online = dict(model.named_parameters())
    model.momentum_update()
    for n, p in model.named_parameters():
        if n in twins_before:
            source = n.replace("_m.", ".", 1)
            expected = 0.995 * twins_before[n] + 0.005 * online[source]
            torch.testing.assert_close(p, expected, msg=n)  # tied tensors updated exactly once


def test_blip_encoder_and_decoder_share_all_but_self_attention():
    model, _ = build_blip(tiny_cfg(BLIPConfig))
    for dec, enc in zip(model.decoder.layer, model.text.encoder.layer, strict=True):
        assert dec.crossattention is enc.crossattention
        assert dec.intermediate is enc.intermediate and dec.output is enc.output
        assert dec.output.dense.weight is enc.output.dense.weight
        assert dec.attention is not enc.attention
        assert dec.attention.self.query.weight.data_ptr() != enc.attention.self.query.weight.data_ptr()
    assert model.lm_head.decoder.weight is model.text.embeddings.word_embeddings.weight
    unique = {id(p) for p in model.parameters()}
    assert len(unique) == len(list(model.parameters()))


def test_blip_caption_labels_skip_prompt_and_padding():
    model, tok = build_blip(tiny_cfg(BLIPConfig, prompt="a picture of "))
    prefix = prompt_prefix(tok, "a picture of ")
    assert prefix[0] == tok.info.dec_id and len(prefix) == 4 == model.prompt_length
    tokens = tok(["a red circle", "two small blue squares"])
    ids, mask, labels = model.caption_labels(tokens["input_ids"], tokens["attention_mask"])
    assert (ids[:, 0] == tok.info.dec_id).all()
    assert (labels[:, :4] == -100).all()
    assert labels[0, 4] == tokens["input_ids"][0, 1]  # the first caption word, right after the prompt
    assert (labels[mask == 0] == -100).all()
    assert (mask.sum(1) == tokens["attention_mask"].sum(1) + 3).all()  # [CLS] -> [DEC] + 3 prompt tokens
    assert tok.decode(ids[0]) == "a picture of a red circle"


def test_blip_generates_from_its_decoder():
    torch.manual_seed(0)
    model, tok = build_blip(tiny_cfg(BLIPConfig))
    model.eval()
    images, _, _ = batch(tok)
    prefix = torch.tensor(prompt_prefix(tok, "a picture of ")).expand(B, -1)
    for method in ("greedy", "beam", "nucleus"):
        ids = model.generate(images, prefix, GenerationConfig(method=method, max_length=6, min_length=2))
        assert ids.shape[0] == B and 2 <= ids.shape[1] <= 6
    greedy = model.generate(images, prefix, GenerationConfig(method="greedy", max_length=6, min_length=2))
    manual = prefix.clone()
    tokens, _ = model.image_tokens_and_feat(images)
    with torch.no_grad():
        for _ in range(2):
            nxt = model.decoder_logits(manual, torch.ones_like(manual), tokens)[:, -1]
            nxt[:, tok.info.eos_id] = float("-inf")
            nxt[:, tok.info.pad_id] = float("-inf")
            manual = torch.cat([manual, nxt.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy[:, :2], manual[:, prefix.shape[1]:])


def test_itm_score_is_a_probability():
    model, tok = build_albef(tiny_cfg(ALBEFConfig, fusion_layers=1))
    images, tokens, _ = batch(tok)
    score = model.itm_score(images, tokens["input_ids"], tokens["attention_mask"])
    assert score.shape == (B,) and ((score >= 0) & (score <= 1)).all()
    with pytest.raises(ValueError, match="fusion_layers"):
        build_albef(tiny_cfg(ALBEFConfig, fusion_layers=2))
