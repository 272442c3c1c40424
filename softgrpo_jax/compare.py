"""``softgrpo compare``: discrete-token GRPO against SofT-GRPO, several seeds each, evaluated in several decodings.

For every seed and every arm (``grpo``: discrete rollouts and the GRPO loss on their tokens; ``softgrpo``: the
config's soft rollouts, Gumbel by default) one training run (:class:`softgrpo_jax.train.Run`) starts from the same
model on the same problems with the same number of rollouts and updates; the arms' configs differ only in
``rl.algorithm`` and ``rollout.mode`` (checked, and listed in ``compare.json``). Every trained policy and the
untrained model are then evaluated on the held-out split (``data.eval``, one entry) in each decoding of
``compare.decodings`` (:data:`DECODINGS`, the original's evaluation settings), ``eval.n_samples`` samples per
problem, with the same evaluation key for every policy. The driver writes, under ``trainer.output_dir``:

* ``base/`` and ``<arm>/seed_<s>/``: each run's own folder (``metrics.jsonl``, ``eval/<decoding>/`` reports) and its
  ``compare_result.json``; a run whose result file is there (same settings) is not run again, so the same command
  resumes an interrupted comparison (an interrupted training run resumes from its checkpoint);
* ``compare.json``: every number (per run, per decoding: pass@1, pass@k with the unbiased and the first-k
  estimator for k in powers of two up to n, maj@k, lengths, the per-problem correctness; per-step training
  metrics; means and standard deviations over seeds; paired SofT-GRPO minus GRPO differences);
* ``compare.md``: the tables (mean +- std over seeds per arm x decoding, the untrained row) and ``compare.png``: the
  per-step training reward and response length per arm (mean and +-1 std band over seeds), pass@k against k.

The report's arithmetic (:func:`mean_std`, :func:`aggregate`, :func:`paired_differences`, :func:`policy_summary`)
is plain NumPy over the per-sample correctness, so it can be checked without a model. See docs/compare.md.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence

import numpy as np

# arm -> (rl.algorithm, rollout.mode); None: the config's rollout.mode (the soft mode SofT-GRPO trains with)
ARMS: dict[str, tuple[str, str | None]] = {"grpo": ("grpo", "discrete"), "softgrpo": ("softgrpo", None)}
ARM_LABELS = {"grpo": "GRPO", "softgrpo": "SofT-GRPO", "base": "untrained"}

# evaluation decodings: eval.* settings, the original's evaluation scripts (docs/algorithm.md, Evaluation)
DECODINGS: dict[str, dict] = {
    # run_sample_discrete-token_grpo.sh: discrete chain of thought
    "discrete": dict(mode="discrete", temperature=0.6, top_p=0.95, top_k=30, max_topk=30, tau=0.5, noise_factor=1.0),
    # run_sample_gumbel.sh: soft thinking with Gumbel noise, as SofT-GRPO models are evaluated
    "soft": dict(mode="gumbel", temperature=1.0, top_p=0.95, top_k=5, max_topk=5, tau=0.1, noise_factor=1.0),
    # run_sample_gumbel_grpo.sh: soft thinking with Gumbel noise, as GRPO and base models are evaluated
    "soft_grpo": dict(mode="gumbel", temperature=0.6, top_p=0.95, top_k=30, max_topk=30, tau=0.5, noise_factor=1.0),
}

RESULT_FILE = "compare_result.json"
# two-sided 5% critical values of Student's t by degrees of freedom (seeds - 1)
T_CRIT_5 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
            15: 2.131, 20: 2.086, 30: 2.042}


def t_critical(dof: int) -> float:
    """The two-sided 5% critical value of Student's t with ``dof`` degrees of freedom (the next tabulated lower dof
    above 10, so never too small; 1.96 beyond 30)."""
    if dof < 1:
        return float("inf")
    if dof > 30:
        return 1.96
    return T_CRIT_5[max(d for d in T_CRIT_5 if d <= dof)]
# settings that do not change what a run computes (or are the comparison's own), left out of the resume check
_IGNORED = ("name", "trainer.output_dir", "trainer.progress", "trainer.tensorboard", "trainer.compilation_cache",
            "trainer.keep_checkpoints", "trainer.save_every", "trainer.export_hf", "trainer.log_every",
            "trainer.eval_before", "eval.batch_size", "eval.ks", "reward.workers", "data.data_dir",
            "data.manual_dir")
# what the untrained model's evaluation depends on
_BASE_KEYS = ("model.", "data.reasoning_gym.", "data.eval", "data.prompt_style", "data.max_prompt_length",
              "eval.", "rollout.noise", "rollout.think_end", "rollout.dtype", "reward.timeout_s")


# ------------------------------------------------------------------------------------------------------------------
# the report's arithmetic (pure NumPy)
# ------------------------------------------------------------------------------------------------------------------

def ks_for(n: int) -> list[int]:
    """Powers of two up to ``n``, and ``n`` itself."""
    ks = [1 << i for i in range(max(int(n), 1).bit_length()) if (1 << i) <= n]
    return ks + ([int(n)] if n not in ks else [])


def policy_summary(records: Sequence[Mapping], ks: Sequence[int]) -> dict:
    """:func:`softgrpo_jax.evaluation.summarize` of one policy's records, plus ``pass@1_se``: the standard error of
    pass@1 over problems (sample std of the per-problem pass rates / sqrt(problems); None for one problem)."""
    from softgrpo_jax import evaluation

    s = evaluation.summarize(records, ks=ks)
    rates = np.asarray([np.mean(np.asarray(r["correct"], bool)) for r in records], np.float64)
    s["pass@1_se"] = float(rates.std(ddof=1) / math.sqrt(len(rates))) if len(rates) > 1 else None
    return s


def mean_std(values: Sequence) -> dict:
    """``{"mean", "std", "n", "values"}`` of the finite values (``std``: sample std, n - 1; None below two)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "n": int(len(v)), "values": [float(x) for x in v]}


def _metric_keys(summaries: Sequence[Mapping]) -> list[str]:
    keys = []
    for s in summaries:
        for k, v in s.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n_problems":
                keys.append(k)
    return keys


def aggregate(summaries: Sequence[Mapping]) -> dict:
    """Each numeric metric of several seeds' summaries as :func:`mean_std`."""
    return {k: mean_std([s.get(k) for s in summaries]) for k in _metric_keys(summaries)}


def paired_differences(a: Mapping[int, Mapping], b: Mapping[int, Mapping]) -> dict:
    """``a - b`` per metric over the seeds both hold (paired by seed): :func:`mean_std` of the differences plus
    ``se`` (std / sqrt(n)), ``t`` (mean / se; None when the differences do not vary or fewer than two) and
    ``beyond_seed_noise`` (|t| above the two-sided 5% critical value, :func:`t_critical`)."""
    seeds = [s for s in a if s in b]
    out = {}
    for k in _metric_keys([a[s] for s in seeds]):
        d = [a[s][k] - b[s][k] for s in seeds if a[s].get(k) is not None and b[s].get(k) is not None]
        m = mean_std(d)
        m["se"] = m["std"] / math.sqrt(m["n"]) if m["std"] is not None else None
        m["t"] = m["mean"] / m["se"] if m["se"] else None
        m["beyond_seed_noise"] = abs(m["t"]) > t_critical(m["n"] - 1) if m["t"] is not None else None
        m["seeds"] = seeds
        out[k] = m
    return out


def correct_strings(records: Sequence[Mapping]) -> list[str]:
    """Per problem, its samples' correctness as a string of 0/1 (compact, for compare.json)."""
    return ["".join("1" if c else "0" for c in r["correct"]) for r in records]


# ------------------------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------------------------

def flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def _plain(cfg) -> dict:
    return json.loads(cfg.to_json_best_effort())


def arm_config(cfg, arm: str, seed: int):
    """The training config of one arm and seed: ``cfg`` with the arm's ``rl.algorithm`` / ``rollout.mode``, the
    seed, its own output folder, and no evaluation before training (the comparison evaluates the untrained model)."""
    algorithm, mode = ARMS[arm]
    c = copy.deepcopy(cfg)
    c.name = f"{cfg.name}-{arm}-seed{seed}"
    c.rl.algorithm = algorithm
    c.rollout.mode = mode or cfg.rollout.mode
    c.trainer.seed = int(seed)
    c.trainer.output_dir = os.path.join(os.path.abspath(cfg.trainer.output_dir), arm, f"seed_{seed}")
    c.trainer.eval_before = False
    return c


def config_differences(a, b, ignore: Sequence[str] = ("name", "trainer.output_dir")) -> list[str]:
    """Keys whose values differ between two configs."""
    fa, fb = flatten(_plain(a)), flatten(_plain(b))
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def decoding_eval(cfg, name: str):
    """``cfg.eval`` with decoding ``name``'s settings."""
    e = copy.deepcopy(cfg.eval)
    for k, v in DECODINGS[name].items():
        e[k] = v
    return e


def fingerprint(cfg, *, base: bool = False) -> dict:
    flat = flatten(_plain(cfg))
    flat = {k: v for k, v in flat.items() if k not in _IGNORED and not k.startswith("compare.")}
    if base:
        flat = {k: v for k, v in flat.items() if k.startswith(_BASE_KEYS)}
    return flat


def check_config(cfg) -> None:
    """The comparison's own checks (``validate_config`` checked each setting already)."""
    from softgrpo_jax.config import ConfigError

    if len(cfg.data.eval) != 1:
        raise ConfigError(f"data.eval={tuple(cfg.data.eval)!r}: softgrpo compare evaluates one held-out split; give "
                          f"one entry (e.g. reasoning_gym_math:test)")
    if "softgrpo" in cfg.compare.arms and cfg.rollout.mode == "discrete":
        raise ConfigError("rollout.mode='discrete' makes the softgrpo arm the same as the grpo arm; set the soft "
                          "mode SofT-GRPO trains with (gumbel)")
    out = os.path.abspath(cfg.trainer.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"trainer.output_dir={cfg.trainer.output_dir!r} is a file, not a folder; choose another "
                          f"output folder")


# ------------------------------------------------------------------------------------------------------------------
# evaluation of one policy in every decoding
# ------------------------------------------------------------------------------------------------------------------

def evaluate_policy(cfg, model, tokenizer, mesh, bench: Mapping[str, Sequence[dict]], decodings: Sequence[str],
                    out_dir: str, *, tag: str) -> dict:
    """Evaluate ``model`` in each decoding (``out_dir/eval/<decoding>/``: the usual reports); per decoding
    ``{"summary", "correct", "timing"}``."""
    import jax

    from softgrpo_jax import evaluation
    from softgrpo_jax.config import eval_sampling_config
    from softgrpo_jax.eval_runner import evaluate
    from softgrpo_jax.sampling import RolloutEngine
    from softgrpo_jax.train import log

    ks = ks_for(cfg.eval.n_samples)
    (name, problems), = bench.items()
    out = {}
    for dec in decodings:
        e = decoding_eval(cfg, dec)
        eng = RolloutEngine.for_tokenizer(model, eval_sampling_config(e, cfg.rollout), tokenizer,
                                          think_end=cfg.rollout.think_end, mesh=mesh, embed_impl=cfg.rollout.embed_impl,
                                          dtype=cfg.rollout.dtype or None, layout=cfg.rollout.layout)
        pbar = None
        if cfg.trainer.progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(problems) * e.n_samples, desc=f"eval {tag} ({dec})", unit="sample",
                        dynamic_ncols=True)
        t0 = time.time()
        res, timing = evaluate(eng, tokenizer, bench, n=e.n_samples, batch_size=e.batch_size,
                               key=jax.random.key(e.seed), model=model, scorer=e.scorer,
                               workers=cfg.reward.workers or None, timeout_s=cfg.reward.timeout_s,
                               progress=pbar.update if pbar is not None else None)
        if pbar is not None:
            pbar.close()
        records = res[name]
        evaluation.write_reports(os.path.join(out_dir, "eval", dec), res, ks=ks,
                                 config={"tag": tag, "decoding": dec, **DECODINGS[dec]}, title=f"{tag} ({dec})")
        s = policy_summary(records, ks)
        out[dec] = {"summary": s, "correct": correct_strings(records), "timing": {**timing[name],
                                                                                  "total_s": time.time() - t0}}
        log(f"compare: {tag} ({dec}): pass@1 {s['pass@1']:.3f}, unbiased pass@{ks[-1]} "
            f"{s[f'unbiased_pass@{ks[-1]}']:.3f}, {s['mean_response_tokens']:.1f} tokens "
            f"({time.time() - t0:.0f} s)")
    return out


def _eval_bench(cfg, tokenizer) -> dict:
    from softgrpo_jax.train import load_problems

    name, _, split = cfg.data.eval[0].partition(":")
    probs, _ = load_problems(cfg, name, split or "test", tokenizer, limit=cfg.data.eval_limit)
    if not probs:
        from softgrpo_jax.config import ConfigError

        raise ConfigError(f"data.eval={cfg.data.eval[0]!r} holds no problems (after data.max_prompt_length="
                          f"{cfg.data.max_prompt_length}); choose another split or raise the limit")
    return {name if name != "reasoning_gym_math" else "reasoning_gym": probs}


# ------------------------------------------------------------------------------------------------------------------
# results on disk
# ------------------------------------------------------------------------------------------------------------------

def _read_result(path: str, fp: dict, what: str) -> dict | None:
    from softgrpo_jax.config import ConfigError

    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # cut short by a kill: run it again
    old = res.get("fingerprint", {})
    # a setting the code has gained since (absent there) is not a difference: its default is the old behaviour
    diff = sorted(k for k in old if old.get(k) != fp.get(k))
    if diff:
        shown = ", ".join(f"{k} ({old.get(k)!r} there, {fp.get(k)!r} now)" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ConfigError(f"{path} holds the {what} of other settings: {shown}{more}; choose a new "
                          f"trainer.output_dir, or move {os.path.dirname(path)} aside to run it again")
    return res


def _train_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if m.get("kind", "train") == "train":
                    rows.append(m)
    return rows


def run_base(cfg, root: str) -> dict:
    """The untrained model in every decoding (missing decodings only, when an earlier result is there)."""
    from softgrpo_jax import evaluation, load_pretrained, load_tokenizer
    from softgrpo_jax.distributed import make_mesh
    from softgrpo_jax.train import enable_compilation_cache, log

    out = os.path.join(root, "base")
    path = os.path.join(out, RESULT_FILE)
    fp = fingerprint(cfg, base=True)
    res = _read_result(path, fp, "untrained model's evaluation") or {"fingerprint": fp, "decodings": {}}
    missing = [d for d in cfg.compare.decodings if d not in res["decodings"]]
    if not missing:
        log(f"compare: untrained model: result in {path}")
        return res
    enable_compilation_cache(cfg.trainer.compilation_cache)
    mc = cfg.model
    mesh = make_mesh(tuple(cfg.trainer.mesh))
    log(f"compare: evaluating the untrained model {mc.path} ({', '.join(missing)})")
    model = load_pretrained(mc.path, dtype=mc.param_dtype, compute_dtype=mc.compute_dtype, mesh=mesh,
                            scan_layers=mc.scan_layers, remat=mc.remat, attention=mc.attention)
    tok = load_tokenizer(mc.path)
    bench = _eval_bench(cfg, tok)
    res["decodings"].update(evaluate_policy(cfg, model, tok, mesh, bench, missing, out, tag="untrained"))
    evaluation.write_json(path, res)
    del model
    gc.collect()
    return res


def _has_checkpoint(run_dir: str) -> bool:
    d = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(d) and any(x.isdigit() for x in os.listdir(d))


def stored_arm(cfg, arm: str, seed: int) -> tuple[dict | None, list[str]]:
    """(the stored result of one arm and seed or None, the decodings it still needs); a result of other settings,
    or one that lacks a decoding when the policy is gone, is a ConfigError."""
    from softgrpo_jax.config import ConfigError

    rc = arm_config(cfg, arm, seed)
    run_dir = rc.trainer.output_dir
    path = os.path.join(run_dir, RESULT_FILE)
    res = _read_result(path, fingerprint(rc), f"{arm} seed {seed} run")
    want = list(cfg.compare.decodings)
    if res is None:
        return None, want
    missing = [d for d in want if d not in res["decodings"]]
    if missing and not _has_checkpoint(run_dir):
        raise ConfigError(f"{path} has no evaluation in decoding {', '.join(missing)} and the run's checkpoints "
                          f"were removed (compare.keep_checkpoints=false); move {run_dir} aside to train it "
                          f"again, or leave {', '.join(missing)} out of compare.decodings")
    return res, missing


def run_arm(cfg, arm: str, seed: int) -> dict | None:
    """Train one arm with one seed and evaluate the policy (only what the stored result lacks); None when
    interrupted."""
    from softgrpo_jax import evaluation
    from softgrpo_jax.train import Run, log

    rc = arm_config(cfg, arm, seed)
    run_dir = rc.trainer.output_dir
    path = os.path.join(run_dir, RESULT_FILE)
    fp = fingerprint(rc)
    res, missing = stored_arm(cfg, arm, seed)
    if res is not None and not missing:
        return res
    t0 = time.time()
    log(f"compare: {arm} seed {seed}: training {rc.trainer.total_steps or 'one epoch of'} steps "
        f"(rl.algorithm={rc.rl.algorithm}, rollout.mode={rc.rollout.mode}) in {run_dir}")
    run = Run(rc)
    report = run.train(evaluate_after=False)
    if report.get("interrupted"):
        return None
    t_train = time.time() - t0
    bench = _eval_bench(rc, run.tokenizer)
    evals = evaluate_policy(rc, run.policy.model, run.tokenizer, run.mesh, bench, missing, run_dir,
                            tag=f"{arm} seed {seed}")
    prev = res or {}
    res = {"fingerprint": fp, "arm": arm, "seed": int(seed), "rl.algorithm": rc.rl.algorithm,
           "rollout.mode": rc.rollout.mode, "steps": len(_train_metrics(run_dir)),
           "decodings": {**prev.get("decodings", {}), **evals},
           "train_s": prev.get("train_s", t_train), "eval_s": time.time() - t0 - t_train + prev.get("eval_s", 0.0)}
    evaluation.write_json(path, res)
    del run
    gc.collect()
    if not cfg.compare.keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------------------------

def build_report(cfg, base: dict | None, runs: Mapping[str, Mapping[int, dict]], *, root: str,
                 wall_s: float | None = None) -> dict:
    """Everything ``compare.json`` holds, from the per-run results."""
    ks = ks_for(cfg.eval.n_samples)
    decs = list(cfg.compare.decodings)
    arms = list(cfg.compare.arms)
    seeds = [int(s) for s in cfg.compare.seeds]
    rep: dict = {
        "name": cfg.name, "arms": arms, "seeds": seeds, "ks": ks, "n_samples": int(cfg.eval.n_samples),
        "decodings": {d: DECODINGS[d] for d in decs},
        "arm_settings": {a: {"rl.algorithm": ARMS[a][0], "rollout.mode": ARMS[a][1] or cfg.rollout.mode}
                         for a in arms},
        "arm_config_differences": (config_differences(arm_config(cfg, arms[0], seeds[0]),
                                                      arm_config(cfg, arms[1], seeds[0]))
                                   if len(arms) > 1 else []),
        "config": _plain(cfg), "wall_s": wall_s,
    }
    pol: dict = {}
    if base is not None:
        pol["base"] = {d: base["decodings"][d] for d in decs if d in base["decodings"]}
    rep["base"] = {d: v["summary"] for d, v in pol.get("base", {}).items()}
    rep["runs"], rep["aggregate"], rep["train"] = {}, {}, {}
    n_problems = None
    for a in arms:
        done = {s: runs.get(a, {}).get(s) for s in seeds if runs.get(a, {}).get(s) is not None}
        rep["runs"][a] = {str(s): {"decodings": {d: r["decodings"][d]["summary"] for d in decs
                                                 if d in r["decodings"]},
                                   "steps": r.get("steps"), "train_s": r.get("train_s"), "eval_s": r.get("eval_s")}
                          for s, r in done.items()}
        rep["aggregate"][a] = {d: aggregate([r["decodings"][d]["summary"] for r in done.values()
                                             if d in r["decodings"]]) for d in decs}
        rep["train"][a] = {str(s): _train_metrics(os.path.join(root, a, f"seed_{s}")) for s in done}
        pol[a] = {s: r["decodings"] for s, r in done.items()}
    for d in decs:
        for v in list(rep["base"].values()) + [x["decodings"].get(d, {}) for a in arms
                                               for x in rep["runs"][a].values()]:
            n_problems = n_problems or v.get("n_problems")
    rep["n_problems"] = n_problems
    rep["correct"] = {"base": {d: v["correct"] for d, v in pol.get("base", {}).items()},
                      **{a: {str(s): {d: v["correct"] for d, v in dd.items() if d in decs}
                             for s, dd in pol.get(a, {}).items()} for a in arms}}
    diffs = []
    if "grpo" in arms and "softgrpo" in arms:
        def per_seed(a, d):
            return {s: r["decodings"][d]["summary"] for s, r in ((s, runs[a][s]) for s in seeds if
                                                                 runs.get(a, {}).get(s) is not None)
                    if d in r["decodings"]}

        pairs = []
        if "soft" in decs and "discrete" in decs:
            pairs.append(("soft", "discrete", "the paper's pairing: SofT-GRPO with soft thinking vs GRPO discrete"))
        pairs += [(d, d, f"both in {d} decoding") for d in decs]
        for da, db, what in pairs:
            a, b = per_seed("softgrpo", da), per_seed("grpo", db)
            if a and b:
                diffs.append({"a": ["softgrpo", da], "b": ["grpo", db], "what": what,
                              "metrics": paired_differences(a, b)})
    rep["differences"] = diffs
    return rep


def _fmt_pct(m: Mapping | None, *, signed: bool = False) -> str:
    if not m or m.get("mean") is None:
        return "-"
    s = f"{100 * m['mean']:+.1f}" if signed else f"{100 * m['mean']:.1f}"
    if m.get("std") is not None:
        s += f" ± {100 * m['std']:.1f}"
    return s


def _fmt_num(m: Mapping | None) -> str:
    if not m or m.get("mean") is None:
        return "-"
    return f"{m['mean']:.1f}" + (f" ± {m['std']:.1f}" if m.get("std") is not None else "")


def _rows(rep: dict):
    """(label, decoding, {metric: mean_std}) for the untrained model and each arm, decoding by decoding."""
    for d in rep["decodings"]:
        if d in rep["base"]:
            yield "untrained", d, {k: mean_std([v]) for k, v in rep["base"][d].items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for a in rep["arms"]:
            agg = rep["aggregate"][a].get(d) or {}
            n = max((m["n"] for m in agg.values()), default=0)
            if n:
                yield f"{ARM_LABELS[a]} ({n} seed{'s' if n > 1 else ''})", d, agg


def _table(rep: dict, cols: Sequence[tuple[str, str]], fmt) -> list[str]:
    head = ["policy", "decoding"] + [c for c, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, d, m in _rows(rep):
        lines.append("| " + " | ".join([label, d] + [fmt(m.get(k)) for _, k in cols]) + " |")
    return lines + [""]


def _describe_decoding(s: Mapping) -> str:
    if s["mode"] == "discrete":
        return f"discrete tokens, T {s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']}"
    return (f"{s['mode']} soft thinking, T {s['temperature']}, top-p {s['top_p']}, top-k = K {s['max_topk']}, "
            f"tau {s['tau']}, noise {s['noise_factor']}")


def markdown(rep: dict) -> str:
    c = rep["config"]
    rl, ks, n = c["rl"], rep["ks"], rep["n_samples"]
    steps = c["trainer"]["total_steps"] or "one epoch of"
    updates = (rl["train_batch_size"] // rl["mini_batch_size"]) * rl["ppo_epochs"]
    lines = [f"# {rep['name']}: discrete GRPO vs SofT-GRPO", "",
             f"Model `{c['model']['path']}`; training data `{c['data']['train']}:{c['data']['train_split']}`, "
             f"held-out `{c['data']['eval'][0]}` ({rep['n_problems']} problems, {n} samples each per decoding). "
             f"Each arm: {steps} step{'s' if steps != 1 else ''} of {rl['train_batch_size']} prompts x {rl['group_size']} rollouts, "
             f"{updates} optimiser update(s) per step, lr {c['optim']['lr']}, "
             f"{c['rollout']['max_new_tokens']} new tokens; seeds {', '.join(map(str, rep['seeds']))} (the same "
             f"problem order and keys for both arms of a seed).", ""]
    if rep["arm_settings"]:
        arms = "; ".join(f"{ARM_LABELS[a]}: rl.algorithm={s['rl.algorithm']}, rollout.mode={s['rollout.mode']}"
                         for a, s in rep["arm_settings"].items())
        same = (f" The arms' configs differ only in: {', '.join(rep['arm_config_differences'])}."
                if rep["arm_config_differences"] else "")
        lines += [f"Arms: {arms}.{same}", ""]
    lines += ["Decodings (every policy is evaluated in each, with the same keys):", ""]
    lines += [f"- `{d}`: {_describe_decoding(s)}" for d, s in rep["decodings"].items()]
    lines += ["", "Cells: mean ± std over seeds (sample std, n - 1), in percent; the untrained model has one value. "
              "pass@1 is the mean over all samples; unbiased pass@k is Chen et al.'s estimator over the n samples; "
              "first-k pass@k is the original's max over the first k samples; maj@k votes over the first k "
              "samples' answers.", ""]
    lines += ["## pass@k, unbiased (%)", ""]
    lines += _table(rep, [("pass@1", "pass@1")] + [(f"pass@{k}", f"unbiased_pass@{k}") for k in ks if k > 1],
                    _fmt_pct)
    lines += ["## pass@k, first k samples (the original's estimator) (%)", ""]
    lines += _table(rep, [(f"pass@{k}", "pass@1" if k == 1 else f"pass@{k}") for k in ks], _fmt_pct)
    lines += ["## maj@k (%)", ""]
    lines += _table(rep, [(f"maj@{k}", f"maj@{k}") for k in ks], _fmt_pct)
    lines += ["## Mean lengths (tokens)", ""]
    lines += _table(rep, [("response", "mean_response_tokens"), ("thinking", "mean_thinking_tokens")], _fmt_num)
    se = {d: s.get("pass@1_se") for d, s in rep["base"].items() if s.get("pass@1_se") is not None}
    if se:
        lines += ["Sampling noise of one evaluation: the untrained model's pass@1 has a standard error over problems "
                  "of " + ", ".join(f"{100 * v:.1f} points ({d})" for d, v in se.items()) + ".", ""]
    if rep["differences"]:
        dk = ["pass@1"] + [f"unbiased_pass@{k}" for k in ks if k > 1] + [f"pass@{ks[-1]}"]
        head = ["SofT-GRPO minus GRPO", "seeds"] + [k.replace("unbiased_", "") + (" (first-k)" if k == f"pass@{ks[-1]}"
                                                                                 and ks[-1] > 1 else "")
                                                    for k in dk]
        lines += ["## SofT-GRPO minus GRPO, paired by seed (points)", "",
                  "Mean ± std of the per-seed differences of pass@1, unbiased pass@k and (last column) first-k "
                  "pass@n; t = mean / (std / sqrt(seeds)); `*`: |t| above the two-sided 5% critical value of "
                  "Student's t with seeds - 1 degrees of freedom (4.30 for 3 seeds), i.e. a difference beyond seed "
                  "noise. The evaluation's own sampling noise is part of each seed's value.", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for diff in rep["differences"]:
            m = diff["metrics"]
            cells = [f"{diff['a'][1]} vs {diff['b'][1]}" + (" (paper)" if diff["a"][1] != diff["b"][1] else ""),
                     str(m["pass@1"]["n"]) if "pass@1" in m else "-"]
            for k in dk:
                x = m.get(k)
                cell = _fmt_pct(x, signed=True)
                if x and x.get("t") is not None:
                    star = "*" if abs(x["t"]) > t_critical(x["n"] - 1) else ""
                    cell += f" (t {x['t']:.1f}){star}"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    tr = [(a, s, rows) for a, per in rep["train"].items() for s, rows in per.items() if rows]
    if tr:
        lines += ["## Training", "",
                  "| arm | seed | steps | reward, first quarter | reward, last quarter | response tokens, last "
                  "quarter | train min | eval min |", "|---|---|---|---|---|---|---|---|"]
        for a, s, rows in tr:
            q = max(1, len(rows) // 4)
            r0 = np.mean([m["reward_mean"] for m in rows[:q]])
            r1 = np.mean([m["reward_mean"] for m in rows[-q:]])
            ln = np.mean([m["response_length"] for m in rows[-q:]])
            run = rep["runs"][a].get(s, {})
            tmin = "-" if run.get("train_s") is None else f"{run['train_s'] / 60:.1f}"
            emin = "-" if run.get("eval_s") is None else f"{run['eval_s'] / 60:.1f}"
            lines.append(f"| {ARM_LABELS[a]} | {s} | {len(rows)} | {r0:.3f} | {r1:.3f} | {ln:.1f} | {tmin} | "
                         f"{emin} |")
        lines.append("")
    if rep.get("wall_s") is not None:
        lines += [f"Wall time of this command: {rep['wall_s'] / 60:.1f} min (runs finished by an earlier command "
                  f"not included).", ""]
    lines += ["![training curves and pass@k](compare.png)", ""]
    return "\n".join(lines)


def plot(path: str, rep: dict) -> str:
    """compare.png: training reward and response length per step (mean, +-1 std band over seeds), pass@k against k
    (unbiased and first-k; error bars: std over seeds; the untrained model dashed)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from softgrpo_jax.evaluation import atomic_write_bytes

    fig = Figure(figsize=(12, 8), dpi=110)
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
    colors = {"grpo": "C0", "softgrpo": "C3"}
    for ax, key, title in ((axes[0], "reward_mean", "training reward (mean over the step's rollouts)"),
                           (axes[1], "response_length", "training response length (tokens)")):
        for a, per in rep["train"].items():
            runs = [r for r in per.values() if r]
            if not runs:
                continue
            L = min(len(r) for r in runs)
            steps = np.asarray([m["step"] for m in runs[0][:L]])
            vals = np.asarray([[m[key] for m in r[:L]] for r in runs], np.float64)
            mean = vals.mean(0)
            ax.plot(steps, mean, "o-", ms=3, color=colors.get(a), label=f"{ARM_LABELS[a]} ({len(runs)} seeds)")
            if len(runs) > 1:
                sd = vals.std(0, ddof=1)
                ax.fill_between(steps, mean - sd, mean + sd, color=colors.get(a), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    styles = {d: s for d, s in zip(rep["decodings"], ("-", "--", ":", "-."))}
    names = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}
    lines_key = ", ".join(f"{names[st]}: {d}" for d, st in styles.items())
    for ax, fmt, title in ((axes[2], "unbiased_pass@{}", "pass@k, unbiased"),
                           (axes[3], "pass@{}", "pass@k, first k samples (the original's)")):
        for d in rep["decodings"]:
            ks = rep["ks"]
            key = lambda k: "pass@1" if k == 1 else fmt.format(k)  # noqa: E731
            if d in rep["base"]:
                ax.plot(ks, [100 * rep["base"][d].get(key(k), float("nan")) for k in ks], styles[d], color="0.45",
                        marker=".", label=f"untrained, {d}")
            for a in rep["arms"]:
                agg = rep["aggregate"][a].get(d) or {}
                if not agg.get("pass@1", {}).get("n"):
                    continue
                mean = [100 * (agg.get(key(k), {}).get("mean") or float("nan")) for k in ks]
                sd = [100 * (agg.get(key(k), {}).get("std") or 0.0) for k in ks]
                ax.errorbar(ks, mean, yerr=sd, fmt=styles[d], color=colors.get(a), marker="o", ms=3, capsize=3,
                            label=f"{ARM_LABELS[a]}, {d}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rep["ks"], [str(k) for k in rep["ks"]])
        ax.set_ylim(0, 100)
        ax.set_xlabel("k (samples)")
        ax.set_ylabel("%")
        ax.set_title(f"{title} ({lines_key})", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{rep['name']}: mean over seeds, band / bars = ±1 std", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def write_report(root: str, rep: dict) -> None:
    from softgrpo_jax.evaluation import atomic_write_text, write_json

    write_json(os.path.join(root, "compare.json"), rep)
    atomic_write_text(os.path.join(root, "compare.md"), markdown(rep))
    plot(os.path.join(root, "compare.png"), rep)


# ------------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------------

def run_compare(cfg) -> int:
    """``softgrpo compare``: the untrained model, then seed by seed each arm; the report is rewritten after each
    run. Returns 0, or 130 when a training run was interrupted (the same command resumes)."""
    from softgrpo_jax.config import ConfigError
    from softgrpo_jax.errors import os_error_message
    from softgrpo_jax.train import log

    t0 = time.time()
    check_config(cfg)
    root = os.path.abspath(cfg.trainer.output_dir)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"trainer.output_dir: {os_error_message(e)}") from None
    arms, seeds = list(cfg.compare.arms), [int(s) for s in cfg.compare.seeds]
    what = f"{', '.join(arms)} x seeds {seeds}" if arms else "the untrained model only"
    log(f"compare: {what} x decodings {', '.join(cfg.compare.decodings)} in {root}")
    # finished runs first (a result of other settings fails here, before anything is computed)
    runs: dict[str, dict[int, dict]] = {a: {} for a in arms}
    todo = []
    for s in seeds:
        for a in arms:
            res, missing = stored_arm(cfg, a, s)
            if res is not None and not missing:
                runs[a][s] = res
                log(f"compare: {a} seed {s}: finished earlier ({os.path.join(root, a, f'seed_{s}', RESULT_FILE)})")
            else:
                todo.append((s, a))
    base = run_base(cfg, root)
    write_report(root, build_report(cfg, base, runs, root=root, wall_s=time.time() - t0))
    for s, a in todo:
        res = run_arm(cfg, a, s)
        if res is None:
            log(f"compare: stopped during {a} seed {s}; run the same command again to resume")
            return 130
        runs[a][s] = res
        write_report(root, build_report(cfg, base, runs, root=root, wall_s=time.time() - t0))
    log(f"compare: report {os.path.join(root, 'compare.md')} ({(time.time() - t0) / 60:.1f} min)")
    return 0
