"""Evaluation metrics against values computed by hand, and the report writers."""

import json
import math
import os

import numpy as np
import pytest

from softgrpo_jax import evaluation as E

# 3 problems x 4 samples
CORRECT = [[1, 0, 0, 0],
           [0, 0, 0, 1],
           [0, 0, 0, 0]]


def test_pass_at_k_first_by_hand():
    # first-k max: problem 0 solved from k=1, problem 1 only at k=4, problem 2 never
    assert E.pass_at_k_first(CORRECT, 1) == pytest.approx(1 / 3)
    assert E.pass_at_k_first(CORRECT, 2) == pytest.approx(1 / 3)
    assert E.pass_at_k_first(CORRECT, 3) == pytest.approx(1 / 3)
    assert E.pass_at_k_first(CORRECT, 4) == pytest.approx(2 / 3)
    assert E.pass_at_k_first(CORRECT, 64) == pytest.approx(2 / 3)  # k > n: all samples, as the seed
    with pytest.raises(ValueError):
        E.pass_at_k_first(CORRECT, 0)


def test_pass_at_k_unbiased_by_hand():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert E.pass_at_k_unbiased_one(4, 1, 2) == pytest.approx(0.5)
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 5/6
    assert E.pass_at_k_unbiased_one(4, 2, 2) == pytest.approx(5 / 6)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 9/10
    assert E.pass_at_k_unbiased_one(5, 2, 3) == pytest.approx(0.9)
    assert E.pass_at_k_unbiased_one(5, 0, 3) == 0.0
    assert E.pass_at_k_unbiased_one(3, 2, 2) == 1.0  # n - c < k
    assert E.pass_at_k_unbiased_one(10, 3, 1) == pytest.approx(0.3)  # k=1 is the mean
    # the table: problems with c = 1, 1, 0 of n = 4 -> pass@2 = (0.5 + 0.5 + 0) / 3
    assert E.pass_at_k_unbiased(CORRECT, 2) == pytest.approx(1 / 3)
    assert E.pass_at_k_unbiased(CORRECT, 4) == pytest.approx(2 / 3)
    assert math.isnan(E.pass_at_k_unbiased(CORRECT, 5))
    with pytest.raises(ValueError):
        E.pass_at_k_unbiased_one(4, 5, 2)


def test_pass_at_k_unbiased_matches_combinatorics():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        c = int(rng.integers(0, n + 1))
        k = int(rng.integers(1, n + 1))
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert E.pass_at_k_unbiased_one(n, c, k) == pytest.approx(want, abs=1e-12)


def test_maj_at_k_by_hand():
    answers = [["1", "2", "2", "3"],     # k=4: "2" wins (2 votes) and is correct
               ["7", "8", None, "8"],    # k=2: tie 7/8 -> first seen "7" (wrong); k=4: "8" wins (correct)
               [None, None, None, None]]  # no answer: wrong
    correct = [[0, 1, 1, 0],
               [0, 1, 0, 1],
               [0, 0, 0, 0]]
    assert E.maj_at_k(answers, correct, 1) == pytest.approx(0.0)
    assert E.maj_at_k(answers, correct, 2) == pytest.approx(0.0)   # p0: tie 1/2 -> "1" wrong; p1: "7" wrong
    assert E.maj_at_k(answers, correct, 3) == pytest.approx(1 / 3)  # p0: "2" x2
    assert E.maj_at_k(answers, correct, 4) == pytest.approx(2 / 3)
    assert E.majority_vote(["a", "b", "b"], [True, False, False]) is False


def test_normalize_answer_for_voting():
    keys = {E.normalize_answer(s) for s in ("0.5", "\\frac{1}{2}", "1/2", "\\dfrac12", "\\frac12", ".5")}
    assert keys == {"1/2"}
    assert E.normalize_answer("1,000") == E.normalize_answer("1000") == "1000"
    assert E.normalize_answer("\\text{5}") == "5"
    assert E.normalize_answer("x = 5") == "5"
    assert E.normalize_answer("18.0") == "18"
    assert E.normalize_answer("\\sqrt{2}") == "\\sqrt{2}"
    assert E.normalize_answer(None) is None


def test_thinking_length():
    assert E.thinking_length([5, 6, 9, 7, 8], 9) == 3
    assert E.thinking_length([5, 6, 7], 9) == 3
    assert E.thinking_length([5, 6, 7], None) == 3


def _results():
    return [
        {"id": "p0", "gold": "2", "correct": [True, False, False, False], "answers": ["2", "1", "1", "3"],
         "response_tokens": [10, 20, 30, 40], "thinking_tokens": [5, 10, 15, 20]},
        {"id": "p1", "gold": "8", "correct": [False, False, False, True], "answers": ["7", "7", None, "8"],
         "response_tokens": [100, 100, 100, 100], "thinking_tokens": [50, 50, 50, 50]},
        {"id": "p2", "gold": "1", "correct": [False] * 4, "answers": [None] * 4,
         "response_tokens": [1, 1, 1, 1], "thinking_tokens": [1, 1, 1, 1]},
    ]


def test_summarize():
    s = E.summarize(_results(), ks=(1, 2, 4, 8))
    assert s["n_problems"] == 3 and s["n_samples"] == 4
    assert s["pass@1"] == pytest.approx((0.25 + 0.25 + 0) / 3)
    assert s["unbiased_pass@1"] == pytest.approx(s["pass@1"])
    assert s["pass@2"] == pytest.approx(1 / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert s["pass@8"] == pytest.approx(2 / 3)
    assert s["unbiased_pass@2"] == pytest.approx(1 / 3)
    assert "unbiased_pass@8" not in s and "maj@8" not in s
    assert s["maj@4"] == pytest.approx(0.0)  # p0: "1" x2 wrong; p1: "7" x2 wrong
    assert s["mean_response_tokens"] == pytest.approx((100 + 400 + 4) / 12)
    assert s["mean_thinking_tokens"] == pytest.approx((50 + 200 + 4) / 12)
    no_answers = [{k: v for k, v in r.items() if k != "answers"} for r in _results()]
    s2 = E.summarize(no_answers, ks=(1, 2))
    assert not any(k.startswith("maj@") for k in s2)
    with pytest.raises(ValueError):
        E.summarize([])
    # samples whose check did not finish: counted when the records carry the count, shown when there are any
    assert "unverified" not in s and "unverified" not in E.markdown_table({"b": s})
    counted = [dict(r, unverified=u) for r, u in zip(_results(), (0, 2, 1))]
    s3 = E.summarize(counted, ks=(1, 2))
    assert s3["unverified"] == 3 and s3["pass@1"] == pytest.approx(s["pass@1"])
    table = E.markdown_table({"b": s3}).splitlines()
    assert table[0].endswith("| unverified |") and table[2].endswith("| 3 |")
    assert "unverified" not in E.markdown_table({"b": E.summarize([dict(r, unverified=0) for r in _results()])})


def test_summarize_ragged_samples():
    res = [{"id": "a", "correct": [True, False]}, {"id": "b", "correct": [False, False, True, True]}]
    s = E.summarize(res, ks=(1, 2, 4))
    assert s["n_samples"] == [2, 4]
    assert s["pass@1"] == pytest.approx((0.5 + 0.5) / 2)
    assert s["pass@4"] == pytest.approx(1.0)
    assert "unbiased_pass@4" not in s and s["unbiased_pass@2"] == pytest.approx((1.0 + (1 - 1 / 6)) / 2)


def test_write_reports(tmp_path):
    out = str(tmp_path / "eval")
    per = {"math500": _results(), "aime24": _results()[:2]}
    summaries = E.write_reports(out, per, ks=(1, 2, 4), config={"mode": "soft", "tau": 0.1}, title="demo")
    files = sorted(os.listdir(out))
    assert files == ["aime24.json", "math500.json", "pass_at_k.png", "summary.json", "summary.md"]
    with open(os.path.join(out, "math500.json")) as f:
        obj = json.load(f)
    assert obj["benchmark"] == "math500" and obj["config"]["tau"] == 0.1
    assert obj["summary"]["pass@4"] == pytest.approx(summaries["math500"]["pass@4"])
    assert len(obj["results"]) == 3
    md = open(os.path.join(out, "summary.md")).read()
    assert md.startswith("# demo")
    row = next(line for line in md.splitlines() if line.startswith("| math500"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["math500", "3", "4", "16.7", "33.3", "66.7"]
    with open(os.path.join(out, "pass_at_k.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "x.json")
    E.write_json(path, {"a": 1, "nan": float("nan"), "arr": np.arange(2)})
    assert json.load(open(path)) == {"a": 1, "nan": None, "arr": [0, 1]}
    with pytest.raises(TypeError):
        E.write_json(path, {"bad": object()})
    with pytest.raises(TypeError):
        E.atomic_write_bytes(path, "not bytes")  # fails after the temporary file was created
    assert json.load(open(path))["a"] == 1
    assert os.listdir(tmp_path) == ["x.json"]  # no temp file left behind
