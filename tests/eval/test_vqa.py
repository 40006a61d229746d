"""The official VQAv2 accuracy: vlzoo's scorer against an independent port of the official
script (tests/eval/official_vqa.py) on answers that exercise every normalisation rule."""

from __future__ import annotations

import json

import pytest
from official_vqa import official_vqa_scores
from vqa_fixture import vqa_fixture

from vlzoo.eval.formats import FormatError
from vlzoo.eval.vqa import exact_match, normalize_answer, official_accuracy, vqa_accuracy
from vlzoo.evaluate import score_vqa_files


def write(tmp_path, questions, annotations, results):
    paths = [tmp_path / "q.json", tmp_path / "a.json", tmp_path / "r.json"]
    for path, value in zip(paths, (questions, annotations, results)):
        path.write_text(json.dumps(value))
    return [str(p) for p in paths]


@pytest.mark.parametrize("n, seed", [(120, 0), (120, 14), (80, 3), (300, 1)])
def test_equals_the_official_script(tmp_path, n, seed):
    questions, annotations, results = vqa_fixture(n, seed)
    q, a, r = write(tmp_path, questions, annotations, results)
    ours = score_vqa_files(r, q, a, "vqa", subset=False)
    theirs = official_vqa_scores(questions, annotations, results)
    assert ours["metrics"] == theirs
    assert ours["questions"] == n


def test_rules():
    assert normalize_answer(" The Two dogs.\n") == "2 dogs"
    assert normalize_answer("dont") == "don't" and normalize_answer("1,000") == "1000"
    assert normalize_answer("1.5") == "1.5" and normalize_answer("yes!") == "yes"
    assert official_accuracy("yes", ["Yes"] * 10) == 0.0  # all humans agree: compared as given
    assert official_accuracy("Two", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)  # 4 humans: 1.0 ...
    assert official_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # ... 3: 0.9 (leave-one-out)
    assert official_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert exact_match("The red.", "red") == 1.0
    assert vqa_accuracy(["red", "two"], ["red", ["2", "3", "3"]]) == pytest.approx((1 + 2 / 9) / 2)
    with pytest.raises(ValueError, match="several human answers"):
        official_accuracy("a", ["a"])


def test_gqa_exact_match(tmp_path):
    questions = {"q1": {"imageId": "n1", "question": "what color?", "answer": "red", "types": {"structural": "query"}},
                 "q2": {"imageId": "n1", "question": "is it?", "answer": "yes", "types": {"structural": "verify"}}}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "r.json").write_text(json.dumps([{"questionId": "q1", "prediction": "Red."},
                                                  {"questionId": "q2", "prediction": "no"}]))
    report = score_vqa_files(str(tmp_path / "r.json"), str(tmp_path / "q.json"), None, "gqa", subset=False)
    assert report["metrics"] == {"overall": 50.0, "perStructural": {"query": 100.0, "verify": 0.0}}


def test_bad_files_name_the_file_the_id_and_what_was_expected(tmp_path):
    questions, annotations, results = vqa_fixture(20, 0)
    q, a, r = write(tmp_path, questions, annotations, results)
    first = results[0]["question_id"]

    def fails(new_results, match, subset=False):
        (tmp_path / "r.json").write_text(json.dumps(new_results))
        with pytest.raises(FormatError, match=match):
            score_vqa_files(r, q, a, "vqa", subset)

    fails(results + [{"question_id": 12345678, "answer": "x"}], r"1 question_id\(s\) not in .*q.json: 12345678")
    fails(results + [results[0]], f"question_id {first} appears more than once")
    fails([{"question_id": first}], "entry 0 has no 'answer' field")
    fails(results[1:], f"answers 19 of the 20 questions.*{first}.*--subset")
    (tmp_path / "r.json").write_text(json.dumps(results[1:]))
    assert score_vqa_files(r, q, a, "vqa", subset=True)["questions"] == 19  # counted, not silent
    (tmp_path / "r.json").write_text(json.dumps(results))
    caption_annotations = {"images": [], "annotations": [{"image_id": 1, "id": 1, "caption": "a dog"}]}
    (tmp_path / "a.json").write_text(json.dumps(caption_annotations))
    with pytest.raises(FormatError, match="a.json: expected VQA annotations.*looks like COCO caption annotations"):
        score_vqa_files(r, q, a, "vqa", False)
