"""softgrpo compare: the smoke config end to end on the command line (a tiny random model with SmolLM2's tokenizer),
resuming, stale results; the report's arithmetic on synthetic per-sample correctness against a direct NumPy
computation; the bundled compare configs' arms differ only in the algorithm and the rollout mode."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import make_tiny_smollm_dir
from softgrpo_jax import compare
from softgrpo_jax.config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "softgrpo_jax.cli", "compare", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _in_unit(x):
    return x is None or (isinstance(x, (int, float)) and 0.0 <= x <= 1.0)


def test_compare_smoke_end_to_end(tmp_path):
    model = make_tiny_smollm_dir(str(tmp_path / "m"))
    out = str(tmp_path / "cmp")
    args = ["--config", "compare_smollm2_smoke", f"--config.model.path={model}", f"--config.trainer.output_dir={out}"]
    r = _cli(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("compare.json", "compare.md", "compare.png"):
        assert os.path.getsize(os.path.join(out, f)) > 100, f
    rep = json.load(open(os.path.join(out, "compare.json")))
    arms, seeds, decs = ["grpo", "softgrpo"], ["0", "1"], ["discrete", "soft"]
    assert rep["arms"] == arms and rep["seeds"] == [0, 1] and list(rep["decodings"]) == decs
    assert rep["arm_config_differences"] == ["rl.algorithm", "rollout.mode"]
    assert rep["arm_settings"] == {"grpo": {"rl.algorithm": "grpo", "rollout.mode": "discrete"},
                                   "softgrpo": {"rl.algorithm": "softgrpo", "rollout.mode": "gumbel"}}
    assert rep["ks"] == [1, 2, 4] and rep["n_problems"] == 2
    rate_keys = ["pass@1", "pass@2", "pass@4", "unbiased_pass@2", "unbiased_pass@4", "maj@1", "maj@4"]
    for d in decs:
        s = rep["base"][d]  # the untrained model
        assert s["n_samples"] == 4 and all(_in_unit(s[k]) for k in rate_keys)
        assert len(rep["correct"]["base"][d]) == 2
        for a in arms:
            for seed in seeds:
                s = rep["runs"][a][seed]["decodings"][d]
                assert s["n_problems"] == 2 and all(_in_unit(s[k]) for k in rate_keys), (a, seed, d)
                assert s["mean_response_tokens"] > 0
                assert all(len(c) == 4 and set(c) <= {"0", "1"} for c in rep["correct"][a][seed][d])
            agg = rep["aggregate"][a][d]
            assert agg["pass@1"]["n"] == 2 and all(_in_unit(agg[k]["mean"]) for k in rate_keys)
    for a in arms:
        for seed in seeds:
            steps = rep["train"][a][seed]
            assert [m["step"] for m in steps] == [1] and _in_unit(steps[0]["reward_mean"])
            run_dir = os.path.join(out, a, f"seed_{seed}")
            assert os.path.isfile(os.path.join(run_dir, compare.RESULT_FILE))
            assert not os.path.exists(os.path.join(run_dir, "checkpoints"))  # compare.keep_checkpoints=false
    pairs = [(x["a"][1], x["b"][1]) for x in rep["differences"]]
    assert pairs == [("soft", "discrete"), ("discrete", "discrete"), ("soft", "soft")]
    md = open(os.path.join(out, "compare.md")).read()
    for d in decs:
        assert f"| untrained | {d} |" in md and f"| GRPO (2 seeds) | {d} |" in md and f"| SofT-GRPO (2 seeds) | {d} |" in md
    assert "rl.algorithm, rollout.mode" in md and "![training curves and pass@k](compare.png)" in md

    # the same command again: every run is finished, nothing is computed
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("finished earlier") == 4 and "training" not in r.stdout
    assert json.load(open(os.path.join(out, "compare.json")))["aggregate"] == rep["aggregate"]
    # other settings in the same folder: one line, nothing touched
    r = _cli(*args, "--config.optim.lr=0.001")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softgrpo: error: ") and "optim.lr" in err[0], r.stderr


# ------------------------------------------------------------------------------------------ the report's arithmetic
def _records(correct, rng):
    out = []
    for row in correct:
        answers = [str(rng.integers(0, 3)) if rng.random() < 0.9 else None for _ in row]
        out.append({"id": "p", "gold": "1", "correct": [bool(c) for c in row], "answers": answers,
                    "response_tokens": list(rng.integers(5, 50, len(row))),
                    "thinking_tokens": list(rng.integers(0, 5, len(row)))})
    return out


def _unbiased(c, n, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_report_math_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    P, n, seeds, decs, arms = 7, 8, [0, 1, 2], ["discrete", "soft"], ["grpo", "softgrpo"]
    cfg = get_config("compare_smollm2_smoke", [f"--config.eval.n_samples={n}", "--config.compare.seeds=(0,1,2)",
                                               f"--config.trainer.output_dir={tmp_path}"])
    ks = compare.ks_for(n)
    assert ks == [1, 2, 4, 8]
    # per-sample correctness: problem difficulty x arm x seed
    p = rng.uniform(0.05, 0.9, P)
    corr = {a: {s: {d: rng.random((P, n)) < np.clip(p + 0.1 * i - 0.05 * j, 0, 1)[:, None]
                    for j, d in enumerate(decs)} for s in seeds} for i, a in enumerate(arms)}
    base_corr = {d: rng.random((P, n)) < p[:, None] for d in decs}

    def result(cs):
        recs = {d: _records(cs[d], rng) for d in decs}
        return {"decodings": {d: {"summary": compare.policy_summary(recs[d], ks),
                                  "correct": compare.correct_strings(recs[d])} for d in decs}}

    base = result(base_corr)
    runs = {a: {s: result(corr[a][s]) for s in seeds} for a in arms}
    for a in arms:  # per-step rewards for the curves
        for s in seeds:
            d = tmp_path / a / f"seed_{s}"
            d.mkdir(parents=True)
            with open(d / "metrics.jsonl", "w") as f:
                for step in range(1, 5):
                    f.write(json.dumps({"step": step, "kind": "train", "reward_mean": float(rng.random()),
                                        "response_length": 30.0 + step}) + "\n")
    rep = compare.build_report(cfg, base, runs, root=str(tmp_path))

    def direct(c):  # c: [P, n] bool -> metric -> value, straight from the definitions
        cnt = c.sum(1)
        out = {"pass@1": c.mean()}
        for k in ks:
            out[f"unbiased_pass@{k}"] = np.mean([_unbiased(int(x), n, k) for x in cnt])
            if k > 1:
                out[f"pass@{k}"] = c[:, :k].any(1).mean()
        return out

    for a in arms:
        for d in decs:
            per_seed = [direct(corr[a][s][d]) for s in seeds]
            for key in per_seed[0]:
                vals = np.array([x[key] for x in per_seed])
                got = rep["aggregate"][a][d][key]
                assert got["n"] == 3
                np.testing.assert_allclose(got["mean"], vals.mean(), rtol=0, atol=1e-12, err_msg=(a, d, key))
                np.testing.assert_allclose(got["std"], vals.std(ddof=1), rtol=0, atol=1e-12, err_msg=(a, d, key))
                np.testing.assert_allclose(got["values"], vals, rtol=0, atol=1e-12)
    for d in decs:
        for key, v in direct(base_corr[d]).items():
            np.testing.assert_allclose(rep["base"][d][key], v, rtol=0, atol=1e-12)
        rates = base_corr[d].mean(1)
        np.testing.assert_allclose(rep["base"][d]["pass@1_se"], rates.std(ddof=1) / math.sqrt(P), atol=1e-12)
    # paired differences, the paper's pairing (SofT-GRPO soft vs GRPO discrete) first
    diff = rep["differences"][0]
    assert diff["a"] == ["softgrpo", "soft"] and diff["b"] == ["grpo", "discrete"]
    for key in ("pass@1", "unbiased_pass@8", "pass@8"):
        dv = np.array([direct(corr["softgrpo"][s]["soft"])[key] - direct(corr["grpo"][s]["discrete"])[key]
                       for s in seeds])
        m = diff["metrics"][key]
        np.testing.assert_allclose([m["mean"], m["std"]], [dv.mean(), dv.std(ddof=1)], atol=1e-12)
        if dv.std(ddof=1) > 0:
            t = dv.mean() / (dv.std(ddof=1) / math.sqrt(3))
            np.testing.assert_allclose(m["t"], t, rtol=1e-12)
            assert m["beyond_seed_noise"] == (abs(t) > 4.303)  # Student's t, 2 degrees of freedom, 5% two-sided
    # the tables show those numbers (percent, mean ± std), the untrained row without a spread
    md = compare.markdown(rep)
    g = rep["aggregate"]["grpo"]["discrete"]["unbiased_pass@4"]
    assert f"{100 * g['mean']:.1f} ± {100 * g['std']:.1f}" in md
    row = [line for line in md.splitlines() if line.startswith("| untrained | soft |")][0]
    assert f"| {100 * rep['base']['soft']['pass@1']:.1f} |" in row and "±" not in row
    assert md.count("| GRPO (3 seeds) | discrete |") == 4  # unbiased, first-k, maj@k and length tables
    compare.write_report(str(tmp_path), rep)
    assert os.path.getsize(tmp_path / "compare.png") > 10000
    json.load(open(tmp_path / "compare.json"))


def test_mean_std_and_ks():
    assert compare.mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1, "values": [0.5]}
    assert compare.mean_std([None, float("nan")])["n"] == 0
    m = compare.mean_std([0.1, 0.3, 0.8])
    assert m["mean"] == pytest.approx(0.4) and m["std"] == pytest.approx(np.std([0.1, 0.3, 0.8], ddof=1))
    assert compare.ks_for(16) == [1, 2, 4, 8, 16] and compare.ks_for(12) == [1, 2, 4, 8, 12]
    # tuples of names on the command line, bare or quoted
    for text in ("(discrete,soft,soft_grpo)", "discrete,soft,soft_grpo", "('discrete','soft','soft_grpo')"):
        cfg = get_config("compare_smollm2", [f"--config.compare.decodings={text}"])
        assert cfg.compare.decodings == ("discrete", "soft", "soft_grpo")
    assert get_config("compare_smollm2", ["--config.compare.arms=()"]).compare.arms == ()


@pytest.mark.parametrize("name", ["compare_smollm2", "compare_smollm2_smoke", "compare_gpu"])
def test_bundled_configs_arms_differ_only_in_algorithm_and_mode(name):
    cfg = get_config(name)
    compare.check_config(cfg)
    assert len(cfg.compare.seeds) >= 2 and set(cfg.compare.decodings) >= {"discrete", "soft"}
    if name != "compare_smollm2_smoke":
        assert len(cfg.compare.seeds) >= 3 and cfg.eval.n_samples >= 16
    g, s = (compare.arm_config(cfg, a, 0) for a in ("grpo", "softgrpo"))
    assert compare.config_differences(g, s) == ["rl.algorithm", "rollout.mode"]
    assert (g.rl.algorithm, g.rollout.mode, s.rl.algorithm, s.rollout.mode) == ("grpo", "discrete", "softgrpo",
                                                                                 "gumbel")
