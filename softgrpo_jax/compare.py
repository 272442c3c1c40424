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
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence

# the report's statistics and rendering (re-exported: compare.mean_std, compare.markdown, ... )
from softgrpo_jax.compare_report import (ARM_LABELS, aggregate, correct_strings, ks_for, markdown,  # noqa: F401
                                         mean_std, paired_differences, plot, policy_summary, t_critical,
                                         write_report)
from softgrpo_jax.config import flatten

# arm -> (rl.algorithm, rollout.mode); None: the config's rollout.mode (the soft mode SofT-GRPO trains with)
ARMS: dict[str, tuple[str, str | None]] = {"grpo": ("grpo", "discrete"), "softgrpo": ("softgrpo", None)}

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


# settings that do not change what a run computes (or are the comparison's own), left out of the resume check
_IGNORED = ("name", "trainer.output_dir", "trainer.progress", "trainer.tensorboard", "trainer.compilation_cache",
            "trainer.keep_checkpoints", "trainer.save_every", "trainer.export_hf", "trainer.log_every",
            "trainer.eval_before", "eval.batch_size", "eval.ks", "reward.workers", "data.data_dir",
            "data.manual_dir")
# what the untrained model's evaluation depends on
_BASE_KEYS = ("model.", "data.reasoning_gym.", "data.eval", "data.prompt_style", "data.max_prompt_length",
              "eval.", "rollout.noise", "rollout.think_end", "rollout.dtype", "reward.timeout_s")


# ------------------------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------------------------



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
    from softgrpo_jax.config import engine_options, eval_sampling_config
    from softgrpo_jax.eval_runner import evaluate
    from softgrpo_jax.sampling import RolloutEngine
    from softgrpo_jax.train import log

    ks = ks_for(cfg.eval.n_samples)
    (name, problems), = bench.items()
    out = {}
    for dec in decodings:
        e = decoding_eval(cfg, dec)
        eng = RolloutEngine.for_tokenizer(model, eval_sampling_config(e, cfg.rollout), tokenizer, mesh=mesh,
                                          **engine_options(cfg.rollout))
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
