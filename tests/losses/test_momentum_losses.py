"""Losses of the momentum family against direct computations."""

import torch
import torch.nn.functional as F

from vlzoo.losses import (
    IGNORE,
    caption_lm_loss,
    distilled_itc_loss,
    distilled_mlm_loss,
    itm_loss,
    mask_tokens,
    positive_targets,
    sample_hard_negatives,
)


def test_positive_targets_spread_over_the_same_image():
    targets = positive_targets(torch.tensor([3, 5]), torch.tensor([3, 5, 3, -1, 7]))
    torch.testing.assert_close(targets, torch.tensor([[0.5, 0, 0.5, 0, 0], [0, 1.0, 0, 0, 0]]))


def test_itc_without_distillation_is_cross_entropy_and_with_it_mixes_targets():
    g = torch.Generator().manual_seed(0)
    sim_i2t, sim_t2i = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    sim_i2t_m, sim_t2i_m = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    targets = positive_targets(torch.arange(4), torch.cat([torch.arange(4), torch.full((5,), -1)]))
    plain = (F.cross_entropy(sim_i2t, torch.arange(4)) + F.cross_entropy(sim_t2i, torch.arange(4))) / 2
    torch.testing.assert_close(distilled_itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets, 0.0), plain)
    alpha = 0.4
    soft_i2t = alpha * sim_i2t_m.softmax(1) + (1 - alpha) * targets
    soft_t2i = alpha * sim_t2i_m.softmax(1) + (1 - alpha) * targets
    direct = (-(sim_i2t.log_softmax(1) * soft_i2t).sum(1).mean() - (sim_t2i.log_softmax(1) * soft_t2i).sum(1).mean()) / 2
    torch.testing.assert_close(distilled_itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets, alpha), direct)


def test_hard_negatives_never_positive_and_follow_the_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.tensor([[10.0, 3.0, 0.0, -5.0]]).repeat(2000, 1)
    positive = torch.zeros(2000, 4, dtype=torch.bool)
    positive[:, 0] = True
    picks = sample_hard_negatives(sim, positive, generator=g)
    counts = torch.bincount(picks, minlength=4).float() / 2000
    assert counts[0] == 0
    expected = torch.tensor([3.0, 0.0, -5.0]).softmax(0)
    torch.testing.assert_close(counts[1:], expected, atol=0.03, rtol=0)
    all_positive = torch.ones(3, 4, dtype=torch.bool)
    assert sample_hard_negatives(torch.zeros(3, 4), all_positive).shape == (3,)


def test_itm_loss_labels_positives_first():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])
    assert itm_loss(logits, num_positive=1) < 0.01
    assert itm_loss(logits, num_positive=3) > 3


def test_mask_tokens_ratios_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 50, (400, 50), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS], [SEP]
    mask = torch.ones_like(ids)
    mask[:, 40:] = 0
    masked, labels = mask_tokens(ids, mask, mask_id=4, vocab_size=50, special_ids=[0, 2, 3, 4], generator=g)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()
    assert abs(chosen.float().sum() / (400 * 39) - 0.15) < 0.01
    torch.testing.assert_close(labels[chosen], ids[chosen])
    to_mask = (masked == 4) & chosen
    unchanged = (masked == ids) & chosen
    assert abs(to_mask.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(unchanged.sum() / chosen.sum() - 0.1) < 0.03  # a random draw may hit the same id
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_distilled_mlm_interpolates_between_hard_and_soft_targets():
    g = torch.Generator().manual_seed(0)
    logits, logits_m = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1], labels[1, 3] = 4, 7
    hard = F.cross_entropy(logits[labels != IGNORE], labels[labels != IGNORE])
    soft = -(logits[labels != IGNORE].log_softmax(-1) * logits_m[labels != IGNORE].softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(distilled_mlm_loss(logits, labels, logits_m, 0.0), hard)
    torch.testing.assert_close(distilled_mlm_loss(logits, labels, logits_m, 0.3), 0.7 * hard + 0.3 * soft)


def test_caption_lm_loss_predicts_the_next_token():
    vocab = 6
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 5, IGNORE]])
    logits = torch.full((1, 6, vocab), -20.0)
    for t in range(5):  # position t predicts labels[t + 1]
        if labels[0, t + 1] != IGNORE:
            logits[0, t, labels[0, t + 1]] = 20.0
    assert caption_lm_loss(logits, labels, label_smoothing=0.0) < 1e-6
    assert caption_lm_loss(logits.roll(1, dims=1), labels, label_smoothing=0.0) > 10
    smoothed = caption_lm_loss(logits, labels, label_smoothing=0.1)
    assert smoothed > 1.0  # label smoothing penalises the over-confident logits
