"""Rewards: the original's strict string reward, the math-verify reward and the evaluation scorer, time-bounded."""

import threading
import time

import numpy as np
import pytest

from softgrpo_jax import rewards as R

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def pool():
    p = R.ScoringPool(2, timeout_s=TIMEOUT)
    yield p
    p.close()


# ------------------------------------------------------------------------------------------ Hendrycks normalisation

@pytest.mark.parametrize("raw, norm", [
    ("\\frac12", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    (".5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("x = 5", "5"),
    ("5\\text{ cm}", "5"),
    ("50\\%", "50"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\$18", "18"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("a\n b", "ab"),
    ("\\!10", "10"),
    ("0.25", "0.25"),
])
def test_strip_string(raw, norm):
    assert R.strip_string(raw) == norm


def test_last_boxed_and_remove_boxed():
    s = "first \\boxed{1} then \\boxed{\\frac{a}{b}} end"
    assert R.last_boxed_only_string(s) == "\\boxed{\\frac{a}{b}}"
    assert R.remove_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert R.last_boxed_only_string("\\fbox{7}") == "\\fbox{7}"
    assert R.remove_boxed("\\fbox{7}") == "7"
    assert R.last_boxed_only_string("so $\\boxed 5$.") == "\\boxed 5"
    assert R.last_boxed_only_string("no box here") is None
    assert R.last_boxed_only_string("\\boxed{unclosed") is None


@pytest.mark.parametrize("text, ans", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("a \\boxed{1} b \\boxed{2}", "2"),
    ("a \\boxed{1} b \\fbox{2}", "2"),
    ("a \\fbox{1} b \\boxed{2}", "2"),
    ("$\\boxed 42$", "42"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("nothing", None),
    ("\\boxed{open", None),
    ("\\boxed", None),
])
def test_extract_boxed_answer(text, ans):
    assert R.extract_boxed_answer(text) == ans


# ------------------------------------------------------------------------------------------ the reward table

# (model output, gold, math_verify reward, strict_string reward)
TABLE = [
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0, 1.0),          # strip_string maps 0.5 -> \frac{1}{2}
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{0.25}", "\\frac{1}{4}", 1.0, 0.0),                         # only math-verify knows 0.25 == 1/4
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0, 1.0),
    ("\\boxed{\\frac34}", "\\frac{3}{4}", 1.0, 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0, 0.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt2", 1.0, 1.0),
    ("\\boxed{10\\text{ cm}}", "10", 1.0, 1.0),
    ("\\boxed{10 \\text{ meters}}", "10", 1.0, 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0, 1.0),
    ("\\boxed{\\$18}", "18", 1.0, 1.0),
    ("\\boxed{18.00}", "18", 1.0, 0.0),
    ("\\boxed{x = 3}", "3", 1.0, 1.0),
    ("first \\boxed{7} but finally \\boxed{8}", "8", 1.0, 1.0),         # several boxes: the last counts
    ("first \\boxed{8} but finally \\boxed{7}", "8", 0.0, 0.0),
    ("the answer is 8", "8", 0.0, 0.0),                                # no box
    ("\\boxed{7}", "8", 0.0, 0.0),                                     # wrong
    ("\\boxed{-3}", "3", 0.0, 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0, 0.0),
    ("\\fbox{4}", "4", 1.0, 1.0),
    ("<think>hmm \\boxed{3}</think> The answer is \\boxed{5}", "5", 1.0, 1.0),
    ("\\boxed{}", "0", 0.0, 0.0),
]


def test_reward_table_math_verify(pool):
    outs, golds, want = [t[0] for t in TABLE], [t[1] for t in TABLE], np.array([t[2] for t in TABLE], np.float32)
    got = R.score_batch(outs, golds, mode="math_verify", pool=pool, timeout_s=10.0)
    bad = [(o, g, w, x) for o, g, w, x in zip(outs, golds, want, got) if w != x]
    assert not bad, bad
    assert got.dtype == np.float32 and got.shape == (len(TABLE),)


def test_reward_table_strict_string():
    outs, golds = [t[0] for t in TABLE], [t[1] for t in TABLE]
    got = R.score_batch(outs, golds, mode="strict_string")
    want = np.array([t[3] for t in TABLE], np.float32)
    bad = [(o, g, w, x) for o, g, w, x in zip(outs, golds, want, got) if w != x]
    assert not bad, bad


def test_inline_matches_pool(pool):
    outs, golds = [t[0] for t in TABLE[:8]], [t[1] for t in TABLE[:8]]
    np.testing.assert_array_equal(R.score_batch(outs, golds, workers=0), R.score_batch(outs, golds, pool=pool))


def test_math_reward_single(pool):
    assert R.math_reward("\\boxed{\\frac{2}{4}}", "\\frac12", pool=pool) == 1.0
    assert R.math_reward("\\boxed{3}", "4", pool=pool) == 0.0
    assert R.math_reward("\\boxed{\\frac{2}{4}}", "\\frac12", mode="strict_string") == 0.0  # not simplified
    with pytest.raises(ValueError, match="unknown reward mode"):
        R.math_reward("\\boxed{1}", "1", mode="exact")


# ------------------------------------------------------------------------------------------ adversarial inputs

ADVERSARIAL = {
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge_factorial": "\\boxed{10^{10^{10}}!}",
    "deep_braces": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "megabytes": "blah {x} " * 300_000 + "\\boxed{5}",
    "megabyte_box": "\\boxed{" + "1+" * 600_000 + "1}",
}


def test_adversarial_outputs_score_zero_within_bound(pool):
    before = pool.stats.timeouts
    t0 = time.monotonic()
    got, unverified = R.score_rows(list(ADVERSARIAL.values()), ["5"] * len(ADVERSARIAL), pool=pool,
                                   timeout_s=TIMEOUT)
    elapsed = time.monotonic() - t0
    # "megabytes" has a real box at the end: it is checked (and correct); everything else scores 0
    assert got.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert pool.stats.timeouts - before >= 2  # the two sympy bombs were killed, not waited for
    # each killed check is flagged (the trainer's reward_unverified, the evaluation's unverified count); the
    # answers refused unchecked (too deep, too long) and the finished check are not
    assert unverified.sum() == pool.stats.timeouts - before and not unverified[2:].any(), unverified
    # 2 workers, 2 timed-out tasks + restarts: a few bounds at most, never a hang
    assert elapsed < 3 * TIMEOUT + 10, elapsed
    # the pool recovered: workers replaced, ordinary checks work
    assert R.score_batch(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "4"], pool=pool).tolist() == [1.0, 0.0]


def test_adversarial_strict_string_is_fast():
    t0 = time.monotonic()
    got = R.score_batch(list(ADVERSARIAL.values()), ["5"] * len(ADVERSARIAL), mode="strict_string")
    assert time.monotonic() - t0 < 5.0
    assert got.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_pool_is_thread_safe(pool):
    outs, golds = [t[0] for t in TABLE], [t[1] for t in TABLE]
    want = np.array([t[2] for t in TABLE], np.float32)
    results = [None] * 3

    def work(i):
        results[i] = R.score_batch(outs, golds, pool=pool, timeout_s=10.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        np.testing.assert_array_equal(r, want)


def test_pool_survives_a_killed_worker(pool):
    proc = pool.processes[0]
    proc.kill()
    proc.wait()
    got = R.score_batch(["\\boxed{2}"] * 4, ["2"] * 4, pool=pool)
    assert got.tolist() == [1.0] * 4
    assert pool.processes[0] is not proc and len(pool.processes) == 2  # the dead worker was replaced


def test_ctrl_c_does_not_kill_a_check_in_flight():
    """A terminal's Ctrl-C reaches the whole process group; the trainer finishes its step on it, so the workers must
    finish the checks they hold instead of dying (which would score them 0 and count errors)."""
    import os
    import signal

    with R.ScoringPool(1, timeout_s=30.0) as p:
        p.run("sleep", [(0.0,)])  # started and ready
        pid = p.processes[0].pid

        def interrupt():
            time.sleep(0.5)
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)

        t = threading.Thread(target=interrupt)
        t.start()
        got = p.run("sleep", [(1.5,)], default="lost")
        t.join()
        assert got == [None] and p.stats.errors == 0 and p.stats.restarts == 0, (got, p.stats)
        assert p.processes[0].pid == pid and p.processes[0].poll() is None


def test_timeouts_do_not_count_as_start_up_failures():
    """Replacing timed-out workers is routine (a verifier that hangs); only workers that die before they are ready,
    many in a row, mean a broken environment."""
    from softgrpo_jax.errors import UserError
    from softgrpo_jax.rewards.pool import RewardWorkerError

    with R.ScoringPool(1, timeout_s=0.2) as p:  # 1 worker: 4 start-up deaths in a row are an error
        assert p.run("sleep", [(5.0,)] * 13, default=-1) == [-1] * 13  # (more than any bound on all restarts)
        assert p.stats.timeouts == 13 and p.stats.restarts == 13
        p.processes[0].kill()  # the replacement dies while it starts: replaced again, no error
        assert p.run("sleep", [(0.0,)] * 2, default=-1) == [None, None]
    assert issubclass(RewardWorkerError, UserError)  # the command line's one-line error


def test_workers_that_cannot_start_end_in_one_error(monkeypatch):
    import sys

    from softgrpo_jax.rewards.pool import RewardWorkerError

    monkeypatch.setattr(sys, "executable", "/bin/false")  # every worker exits at once
    with R.ScoringPool(2, timeout_s=1.0) as p:
        with pytest.raises(RewardWorkerError, match=r"keep dying at start-up \(7 in a row\); run '/bin/false -m"):
            p.run("sleep", [(0.0,)])


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        R.ScoringPool(0)
    with pytest.raises(ValueError, match="gold answers"):
        R.score_batch(["a"], [], workers=0)


# ------------------------------------------------------------------------------------------ evaluation scorer

# (completion, gold, gold format, correct): the seed's matheval.py rule judge on the full completion
EVAL_TABLE = [
    ("<think>try 3</think> so the answer is \\boxed{5}", "5", "expr", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", "latex", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", "latex", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "latex", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", "latex", True),
    ("$\\boxed{10\\text{ cm}}$", "10", "latex", True),
    ("\\boxed{70,000}", "70000", "expr", True),
    ("The answer is 5.", "5", "expr", True),             # ExprExtractionConfig finds an unboxed answer
    ("I first got 12, but the final answer is \\boxed{13}", "12", "expr", False),
    ("\\boxed{7}", "8", "expr", False),
    ("no answer at all", "8", "expr", False),
    ("\\boxed{1} then \\boxed{2}", "2", "latex", False),  # boxed="all": both boxes -> the set {1, 2}
]


def test_eval_scorer_table(pool):
    comps, golds, fmts = zip(*[(c, g, f) for c, g, f, _ in EVAL_TABLE])
    res = R.eval_score_batch(list(comps), list(golds), gold_format=list(fmts), pool=pool, timeout_s=10.0)
    bad = [(c, g, w, x) for (c, g, _, w), x in zip(EVAL_TABLE, res.correct.tolist()) if w != x]
    assert not bad, bad
    assert res.answers[1] == res.answers[2] == "1/2"  # canonical answers for voting
    assert res.answers[10] is None


def test_eval_scorer_adversarial_and_size_cap(pool):
    comps = [ADVERSARIAL["power_tower"], "x" * (R.MAX_COMPLETION_CHARS + 1) + "\\boxed{5}", "\\boxed{5}"]
    t0 = time.monotonic()
    res = R.eval_score_batch(comps, "5", gold_format="expr", pool=pool, timeout_s=TIMEOUT)
    assert time.monotonic() - t0 < 2 * TIMEOUT + 10
    assert res.correct.tolist() == [False, False, True]
    assert res.unverified.tolist() == [True, False, False] and res.timeouts == 1  # killed, not just wrong
    with pytest.raises(ValueError, match="gold_format"):
        R.eval_score_batch(["x"], "1", gold_format="sympy", workers=0)


def test_benchmark_gold_formats():
    assert R.BENCHMARK_GOLD_FORMAT["aime24"] == "expr" and R.BENCHMARK_GOLD_FORMAT["math500"] == "latex"


def test_package_exports():
    # the names the rest of the code base imports from softgrpo_jax.rewards, all re-exported by the package
    for name in ("strip_string", "extract_boxed_answer", "extract_lenient_answer", "score_batch", "eval_score_batch",
                 "math_reward", "EvalScores", "ScoringPool", "PoolStats", "get_pool", "default_workers"):
        assert name in R.__all__ and callable(getattr(R, name)), name
    assert all(hasattr(R, name) for name in R.__all__)
