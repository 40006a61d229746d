import math

import pytest
from torchmetrics.text import BLEUScore

from vlzoo.eval.captioning import bleu4, caption_metrics, cider_d, normalize

REFS = [
    ["A red circle is left of a blue square.", "a red circle next to a square"],
    ["Two small green triangles side by side", "a pair of green triangles"],
    ["a big yellow star above the line", "One yellow star over a line."],
]


def test_normalize():
    expected = "a redcircle left of a square".split()
    assert normalize("  A Red-Circle, LEFT of\ta square!  ") == expected


def test_perfect_predictions():
    preds = [refs[0] for refs in REFS]
    m = caption_metrics(preds, REFS)
    assert set(m) == {"bleu4", "cider"}
    assert m["bleu4"] == pytest.approx(1.0)
    assert m["cider"] > 5.0


def test_wrong_word_scores_lower():
    good = ["a red circle is left of a blue square", "two small green triangles side by side"]
    bad = ["a red circle is left of a blue star", "two small green triangles side by side"]
    refs = REFS[:2]
    assert bleu4(bad, refs) < bleu4(good, refs)
    assert cider_d(bad, refs) < cider_d(good, refs)


def test_bleu4_matches_torchmetrics_on_normalised_text():
    preds = ["A red circle, left of a square.", "green triangles side by side", ""]
    expected = BLEUScore(n_gram=4)(
        [" ".join(normalize(p)) for p in preds],
        [[" ".join(normalize(r)) for r in refs] for refs in REFS],
    )
    assert bleu4(preds, REFS) == pytest.approx(float(expected), abs=1e-7)
    assert 0.0 < bleu4(preds, REFS) < 1.0


def test_cider_d_hand_computed():
    preds = ["A cat, cat!", "a dog runs.", ""]
    refs = [["A cat sits.", "a cat"], ["A dog runs"], ["The dog."]]
    # N = 3 images. df counts images whose references contain the n-gram:
    #   "a", "dog": 2 -> idf H = log(3/2); every other reference n-gram: 1 -> idf T = log 3;
    #   n-grams in no reference (e.g. "cat cat"): df 0 -> log(max(1, 0)) = 0 -> idf T.
    T, H = math.log(3), math.log(1.5)
    # Image 0, candidate "a cat cat" (3 words): uni {a: H, cat: 2T}, bi {a cat: T, cat cat: T},
    # tri {a cat cat: T}.
    #   vs "a cat sits" (3 words, penalty 1): uni {a: H, cat: T, sits: T};
    #     n=1 clipped dot H*H + min(2T, T)*T = H^2 + T^2 over sqrt(H^2+4T^2) sqrt(H^2+2T^2);
    #     n=2 shares "a cat": T^2 / (sqrt2 T * sqrt2 T) = 1/2; n=3 no overlap; n=4 empty.
    ref_a = (H**2 + T**2) / math.sqrt((H**2 + 4 * T**2) * (H**2 + 2 * T**2)) + 0.5
    #   vs "a cat" (2 words, penalty exp(-1/72)): uni {a: H, cat: T} -> (H^2+T^2) / (sqrt(H^2+4T^2)
    #     sqrt(H^2+T^2)); n=2 {a cat: T} -> T^2 / (sqrt2 T * T) = 1/sqrt2; n=3,4 empty.
    ref_b = math.exp(-1 / 72) * (
        math.sqrt(H**2 + T**2) / math.sqrt(H**2 + 4 * T**2) + 1 / math.sqrt(2)
    )
    image0 = 10 * (ref_a + ref_b) / (4 * 2)  # mean over 4 n's and 2 references, times 10
    image1 = 10 * (1 + 1 + 1 + 0) / 4  # exact match: cosine 1 for n=1..3, no 4-grams
    image2 = 0.0  # empty prediction
    expected = (image0 + image1 + image2) / 3
    assert expected == pytest.approx(3.373534052644627, abs=1e-12)  # also pycocoevalcap 1.2
    assert cider_d(preds, refs) == pytest.approx(expected, abs=1e-6)


def test_cider_d_single_image_corpus_is_zero():
    # idf = log(1) - log(max(1, df)) = 0 for every n-gram, so all vectors vanish
    assert cider_d(["a cat"], [["a cat"]]) == 0.0


@pytest.mark.parametrize("fn", [bleu4, cider_d, caption_metrics])
def test_length_mismatch_raises(fn):
    with pytest.raises(ValueError, match="predictions"):
        fn(["a cat", "a dog"], [["a cat"]])


@pytest.mark.parametrize("fn", [bleu4, cider_d])
def test_missing_references_raise(fn):
    with pytest.raises(ValueError, match="no references"):
        fn(["a cat", "a dog"], [["a cat"], []])
