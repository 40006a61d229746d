import math

import torch
import torch.nn.functional as F

from vlzoo.losses import clip_loss, siglip_loss


def _embeds(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1),
            F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_clip_loss_equals_direct_computation():
    images, texts = _embeds()
    scale = torch.tensor(7.5)
    expected = 0.0
    n = len(images)
    for i in range(n):  # row i: image i against all texts; column i: text i against all images
        row = torch.stack([scale * images[i] @ texts[j] for j in range(n)])
        col = torch.stack([scale * texts[i] @ images[j] for j in range(n)])
        expected += -torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    expected = expected / (2 * n)
    torch.testing.assert_close(clip_loss(images, texts, scale), expected)


def test_clip_loss_is_low_for_aligned_pairs():
    images, _ = _embeds()
    assert clip_loss(images, images, torch.tensor(100.0)) < 0.1
    assert clip_loss(*_embeds(), torch.tensor(100.0)) > 1.0


def test_siglip_loss_equals_direct_computation():
    images, texts = _embeds()
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    n = len(images)
    expected = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * images[i] @ texts[j] + bias
            expected += math.log1p(math.exp(-z * logit.item()))
    torch.testing.assert_close(siglip_loss(images, texts, scale, bias), torch.tensor(expected / n))
