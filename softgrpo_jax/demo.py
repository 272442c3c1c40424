"""``softgrpo demo``: the embedded default end to end (evaluate, train with SofT-GRPO, evaluate, report, export)."""

from __future__ import annotations

import json
import os
import time

from ml_collections import ConfigDict

from softgrpo_jax.evaluation import atomic_write_text


def plot_curves(path: str, metrics: list[dict]) -> str | None:
    rows = [m for m in metrics if m.get("kind", "train") == "train"]
    if not rows:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from softgrpo_jax.evaluation import atomic_write_bytes

    steps = [m["step"] for m in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [m["reward_mean"] for m in rows], marker="o", label="reward mean")
    axes[0].plot(steps, [m["group_pass_rate"] for m in rows], marker=".", alpha=0.6, label="group pass rate")
    axes[0].set_title("reward")
    axes[0].legend()
    axes[1].plot(steps, [m["response_length"] for m in rows], marker="o", label="response")
    axes[1].plot(steps, [m["thinking_length"] for m in rows], marker=".", label="thinking (soft)")
    axes[1].set_title("length (tokens)")
    axes[1].legend()
    axes[2].plot(steps, [m["kl_token"] for m in rows], marker="o", label="KL to reference")
    axes[2].plot(steps, [m["clipfrac"] for m in rows], marker=".", label="clip fraction")
    axes[2].set_title("KL / clipping")
    axes[2].legend()
    for a in axes:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(out: str, cfg: ConfigDict, report: dict, elapsed: float) -> str:
    before = report.get("before") or _read_summary(out, "before")
    after = report.get("after") or _read_summary(out, "after")
    metrics = report.get("metrics", [])
    png = plot_curves(os.path.join(out, "curves.png"), metrics)
    lines = [f"# {cfg.name}: SofT-GRPO on the embedded default", "",
             f"model `{cfg.model.path}`, data `{cfg.data.train}`, {report.get('steps')} steps of "
             f"{cfg.rl.train_batch_size} prompts x {cfg.rl.group_size} rollouts, lr {cfg.optim.lr}, "
             f"rollout mode `{cfg.rollout.mode}` (tau {cfg.rollout.tau}, K {cfg.rollout.max_topk}); "
             f"evaluation mode `{cfg.eval.mode}`, {cfg.eval.n_samples} samples per problem; "
             f"wall time {elapsed / 60:.1f} min.", ""]
    if before and after:
        lines += ["| benchmark | metric | before | after |", "|---|---|---|---|"]
        for name in after:
            for k in ["pass@1"] + [f"pass@{k}" for k in cfg.eval.ks if k > 1] + ["mean_response_tokens",
                                                                              "mean_thinking_tokens"]:
                b, a = before.get(name, {}).get(k), after[name].get(k)
                if a is None:
                    continue
                fmt = (lambda v: f"{v:.3f}") if "pass" in k else (lambda v: f"{v:.1f}")
                lines.append(f"| {name} | {k} | {fmt(b) if b is not None else '-'} | {fmt(a)} |")
        lines.append("")
    train = [m for m in metrics if m.get("kind", "train") == "train"]
    if train:
        lines += ["| step | reward | response len | thinking len | KL | grad norm | step s |",
                  "|---|---|---|---|---|---|---|"]
        for m in train:
            lines.append(f"| {m['step']} | {m['reward_mean']:.3f} | {m['response_length']:.1f} | "
                         f"{m['thinking_length']:.1f} | {m['kl_token']:.2e} | {m['grad_norm']:.3f} | "
                         f"{m['step_time_s']:.1f} |")
        lines.append("")
    if png:
        lines += ["![curves](curves.png)", ""]
    if report.get("export"):
        lines += [f"Hugging Face export: `{report['export']}`", ""]
    path = os.path.join(out, "report.md")
    atomic_write_text(path, "\n".join(lines))
    return path


def _read_summary(out, tag):
    p = os.path.join(out, "eval", tag, "summary.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f).get("summaries")
    return None


def run_demo(cfg: ConfigDict) -> int:
    from softgrpo_jax.train import Run, log

    t0 = time.time()
    report = Run(cfg).train()
    if report.get("interrupted"):
        return 130
    path = write_report(report["out"], cfg, report, time.time() - t0)
    log(f"report: {path}")
    return 0
