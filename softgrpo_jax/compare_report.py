"""The report of ``softgrpo compare`` (softgrpo_jax/compare.py): the statistics over seeds and the markdown, JSON and
PNG it writes. Plain NumPy over per-sample correctness, so it can be checked without a model."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

ARM_LABELS = {"grpo": "GRPO", "softgrpo": "SofT-GRPO", "base": "untrained"}

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
