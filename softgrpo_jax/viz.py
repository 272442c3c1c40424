"""Plots for looking at soft-thinking rollouts (the walkthrough notebook uses them)."""

from __future__ import annotations

import numpy as np


def token_label(tokenizer, token_id: int, width: int = 10) -> str:
    """A short printable label for one token id (whitespace made visible, long tokens cut)."""
    s = tokenizer.decode([int(token_id)])
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")
    return s if len(s) <= width else s[:width - 1] + "\u2026"


def topk_trace(tokenizer, rollout, row: int = 0, max_steps: int | None = None):
    """The soft steps of one rollout row: (labels [S][K] of str, weights [S, K]), S = soft steps (capped)."""
    soft = np.asarray(rollout.soft_mask[row])
    n = int(soft.sum()) if max_steps is None else min(int(soft.sum()), max_steps)
    idx = np.flatnonzero(soft)[:n]
    ids = np.asarray(rollout.topk_ids[row])[idx]
    w = np.asarray(rollout.weights[row], np.float32)[idx]
    return [[token_label(tokenizer, t) for t in r] for r in ids], w


def plot_topk_heatmap(labels, weights, *, title: str | None = None, ax=None):
    """Heat map of a soft-thinking trace: rows = steps, columns = the K slots, text = token, colour = weight."""
    import matplotlib.pyplot as plt

    w = np.asarray(weights, np.float32)
    S, K = w.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(1.5 * K + 1.5, 0.32 * S + 1.2))
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(S):
        for k in range(K):
            ax.text(k, i, labels[i][k], ha="center", va="center", fontsize=8,
                    color="black" if w[i, k] > 0.6 else "white")
    ax.set_xticks(range(K), [f"slot {k}" for k in range(K)])
    ax.set_yticks(range(S), [str(i) for i in range(S)])
    ax.set_xlabel("top-K slot (sorted by weight)")
    ax.set_ylabel("soft-thinking step")
    if title:
        ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, label="weight y_k (input mixture)")
    ax.figure.tight_layout()
    return ax.figure
