"""ITM with hard negatives: which (text, image) pairs reach the head, with which label.

A stand-in head scores a pair by whether its text and image carry the same sample id,
so the loss is near zero only when every pair gets its true label: B positives, B
texts with a hard-negative image, B images with a hard-negative text.
"""

from __future__ import annotations

import pytest
import torch

from vlzoo.models.itm import itm_with_hard_negatives

B, L, N, D = 6, 5, 3, 4


def id_matching_logits(calls: list[int]):
    """(P, 2) logits: +20 for "match" when the text's id (its first token) is the image's
    (its first value), -20 otherwise; ``calls`` records each call's number of pairs."""

    def logits(input_ids, attention_mask, image_tokens, text_hidden=None):
        calls.append(len(input_ids))
        same = (input_ids[:, 0].float() == image_tokens[:, 0, 0]).float() * 2 - 1  # (P,) +-1
        return torch.stack([-20 * same, 20 * same], dim=1)

    return logits


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 50, (B, L), generator=g)
    ids[:, 0] = torch.arange(B)  # a text's first token is its sample id
    mask = torch.ones(B, L, dtype=torch.long)
    mask[::2, -2:] = 0  # some padding
    images = torch.randn(B, N, D, generator=g)
    images[:, 0, 0] = torch.arange(B).float()  # an image's first value is its sample id
    sims = torch.randn(B, B, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "index": torch.arange(B), "image_tokens": images,
            "sim_t2i": sims, "sim_i2t": sims.T.contiguous()}


@pytest.mark.parametrize("reuse_text_pass", [False, True], ids=["one-call", "reused-text-pass"])
def test_every_pair_gets_its_true_label(reuse_text_pass: bool) -> None:
    x, calls = batch(), []
    hidden = torch.zeros(B, L, 8) if reuse_text_pass else None
    torch.manual_seed(0)
    loss = itm_with_hard_negatives(id_matching_logits(calls), **x, text_hidden=hidden)
    assert loss.item() < 1e-6
    assert calls == ([2 * B, B] if reuse_text_pass else [3 * B])


def test_one_call_and_two_calls_draw_the_same_pairs() -> None:
    """Same draws, same loss, whether the 3B pairs run in one call or two, under a head
    whose score depends on both ids and image (not only on matching)."""
    x = batch()

    def head(input_ids, attention_mask, image_tokens, text_hidden=None):
        t = (input_ids * attention_mask).float().sum(1, keepdim=True)
        return torch.cat([t.sin(), image_tokens.sum((1, 2))[:, None].cos() * t.cos()], dim=1)

    losses = []
    for hidden in (None, torch.zeros(B, L, 8)):
        torch.manual_seed(0)
        losses.append(itm_with_hard_negatives(head, **x, text_hidden=hidden))
    torch.testing.assert_close(losses[0], losses[1])
