import pytest
import torch
from benchmark_fixtures import brute_force_recall

from vlzoo.eval.retrieval import CaptionIndex, compositional_accuracy, recall_at_k


def test_identical_captions_count_as_matches():
    # image 0 and image 1 share "a red circle"; image 2 is different
    index = CaptionIndex.build([["a red circle", "red round"], ["a red circle"], ["a blue square"]])
    assert index.texts == ["a red circle", "red round", "a red circle", "a blue square"]
    sim = torch.tensor([
        [0.1, 0.2, 0.9, 0.0],  # image 0 ranks text 2 ("a red circle" of image 1) first: a hit
        [0.0, 0.9, 0.1, 0.2],  # image 1 ranks "red round" first: a miss, its own caption second
        [0.9, 0.0, 0.0, 0.1],  # image 2 ranks a red circle first; own caption last (rank 2)
    ])
    m = recall_at_k(sim, index, ks=(1, 2))
    assert m["r1_i2t"] == pytest.approx(1 / 3)
    assert m["r2_i2t"] == pytest.approx(2 / 3)
    # text 0 "a red circle": image 2 first (miss), image 0 second (hit)
    # text 1 "red round": image 1 first (miss), image 0 second (hit)
    # text 2 "a red circle": image 0 first, a hit because image 0 has the same caption
    # text 3 "a blue square": image 1 first (miss), image 2 second (hit)
    assert m["r1_t2i"] == pytest.approx(1 / 4)
    assert m["r2_t2i"] == pytest.approx(1.0)


def test_recall_is_one_for_perfect_similarity_and_chunking_is_invisible():
    captions = [[f"caption {i} a", f"caption {i} b"] for i in range(7)]
    index = CaptionIndex.build(captions)
    sim = (index.text_image[None, :] == torch.arange(7)[:, None]).float() + 0.01 * torch.rand(7, 14)
    assert recall_at_k(sim, index, ks=(1,)) == {"r1_i2t": 1.0, "r1_t2i": 1.0}
    noisy = torch.rand(7, 14)
    assert recall_at_k(noisy, index, chunk=3) == recall_at_k(noisy, index, chunk=100)


def test_compositional_accuracy():
    assert compositional_accuracy(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.2, 0.3, 0.4])) == pytest.approx(2 / 3)


def test_rerank_scores_only_the_top_k_and_adds_the_first_stage():
    from vlzoo.eval.retrieval import rerank_top_k

    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.2, 0.3, 0.7]])
    calls = []

    def itm(queries, candidates):
        calls.append((queries.tolist(), candidates.tolist()))
        return torch.where(candidates == 1, 5.0, 0.0)  # the reranker prefers candidate 1

    out = rerank_top_k(similarity, k=2, score_pairs=itm, batch_size=3)
    assert sorted(q for qs, _ in calls for q in qs) == [0, 0, 1, 1]
    assert out[0].argmax() == 1 and out[1].argmax() == 3  # row 1: candidate 1 is outside its top 2
    assert torch.isinf(out[0, 2]) and torch.isinf(out[1, 1])
    torch.testing.assert_close(out[0, 1], torch.tensor(5.8))


def test_rerank_weights_the_first_stage():
    from vlzoo.eval.retrieval import rerank_top_k

    similarity = torch.tensor([[0.9, 0.8, 0.1]])

    def itm(queries, candidates):
        return torch.where(candidates == 1, 1.0, 0.0)  # ITM prefers candidate 1 by 1.0

    assert rerank_top_k(similarity, 2, itm).argmax() == 1  # 1.8 > 0.9
    weighted = rerank_top_k(similarity, 2, itm, similarity_weight=20.0)  # 18 > 17: the first stage's 0.1 gap wins
    assert weighted.argmax() == 0
    torch.testing.assert_close(weighted[0, 1], torch.tensor(17.0))
    assert rerank_top_k(similarity, 2, itm, similarity_weight=0.0)[0, 0] == 0.0


def test_unique_texts_map_back():
    from vlzoo.eval.retrieval import unique_texts

    texts, of_text = unique_texts(["a", "b", "a", "c"])
    assert texts == ["a", "b", "c"] and of_text.tolist() == [0, 1, 0, 2]


def test_mean_over_prompts_averages_each_class_then_normalises():
    from vlzoo.eval.retrieval import mean_over_prompts

    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [4.0, 0.0]])  # class 0: two prompts, class 1: two
    classes = mean_over_prompts(prompts, num_classes=2)
    torch.testing.assert_close(classes, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [1.0, 0.0]]))


@pytest.mark.parametrize("match_identical", [False, True])
def test_recall_equals_a_brute_force_count_with_ties_and_five_captions_per_image(match_identical):
    gen = torch.Generator().manual_seed(0)
    words = ["a dog", "a cat", "a red bike", "two people", "a horse", "a tree"]
    captions = [[words[int(torch.randint(len(words), (1,), generator=gen))] for _ in range(5)] for _ in range(12)]
    # scores on a coarse grid: many exact ties; and one reranked row of -inf
    similarity = torch.randint(0, 4, (12, 60), generator=gen).float() / 4
    similarity[3, 10:] = float("-inf")
    index = CaptionIndex.build(captions, match_identical=match_identical)
    ours = recall_at_k(similarity, index, chunk=5)
    expected = brute_force_recall(similarity, captions, match_identical)
    assert ours == pytest.approx(expected)
    assert ours != brute_force_recall(similarity, captions, not match_identical)  # the convention matters here


def test_retrieval_summary():
    from vlzoo.eval.retrieval import retrieval_summary

    metrics = {f"r{k}_{d}": v for d, base in (("i2t", 0.5), ("t2i", 0.2)) for k, v in zip((1, 5, 10), (base, base + 0.1, base + 0.2))}
    summary = retrieval_summary(metrics)
    assert summary["rsum"] == pytest.approx(0.5 + 0.6 + 0.7 + 0.2 + 0.3 + 0.4)
    assert summary["r_mean"] == pytest.approx(summary["rsum"] / 6)
    assert summary["txt_r_mean"] == pytest.approx(0.6) and summary["img_r_mean"] == pytest.approx(0.3)
