"""Generate n samples per problem with the rollout engine and score them (docs/algorithm.md, "Evaluation").

Used by ``softgrpo eval`` and by the trainer's before/after evaluations. Rows are generated in fixed-size chunks
(the last one padded) so every chunk reuses one compiled program.
"""

from __future__ import annotations

import time
import zlib
from typing import Sequence

import jax
import numpy as np

from softgrpo_jax import rewards
from softgrpo_jax.distributed import to_host
from softgrpo_jax.sampling import RolloutEngine

BENCHMARK_GOLD_FORMAT = {"aime24": "expr", "aime25": "expr", "gsm8k": "expr", "math500": "latex", "amc23": "latex"}


def decode_rows(tokenizer, rollout, rows: Sequence[int] | None = None) -> list[str]:
    toks = to_host(rollout.tokens)  # to_host: also when the rollout spans several processes (collective)
    lens = to_host(rollout.lengths)
    rows = range(toks.shape[0]) if rows is None else rows
    return [tokenizer.decode(toks[b, :lens[b]].tolist(), skip_special_tokens=True) for b in rows]


def generate_samples(engine: RolloutEngine, tokenizer, problems: Sequence[dict], *, n: int, batch_size: int,
                     key, model=None, progress=None) -> list[dict]:
    """For each problem (with ``prompt_ids``), ``n`` completions: text, token length, thinking length."""
    rows = [(i, s) for i in range(len(problems)) for s in range(n)]
    out = [dict(texts=[], response_tokens=[], thinking_tokens=[], soft_steps=[]) for _ in problems]
    bs = max(1, min(batch_size, len(rows)))
    for start in range(0, len(rows), bs):
        chunk = rows[start:start + bs]
        pad = bs - len(chunk)
        prompts = [problems[i]["prompt_ids"] for i, _ in chunk] + [problems[chunk[-1][0]]["prompt_ids"]] * pad
        r = engine.generate(prompts, key, n=1, row_offset=start, model=model)
        texts = decode_rows(tokenizer, r, range(len(chunk)))
        lens = to_host(r.lengths)
        think = to_host(r.think_lengths)
        soft = to_host(r.soft_mask).sum(1)
        for j, (i, _) in enumerate(chunk):
            out[i]["texts"].append(texts[j])
            out[i]["response_tokens"].append(int(lens[j]))
            out[i]["thinking_tokens"].append(int(think[j]))
            out[i]["soft_steps"].append(int(soft[j]))
        if progress is not None:
            progress(len(chunk))
    return out


def score_samples(problems: Sequence[dict], samples: Sequence[dict], *, benchmark: str, scorer: str = "math_verify_eval",
                  workers: int | None = None, timeout_s: float = 5.0) -> list[dict]:
    """Per-problem records for ``evaluation.summarize``: correct [n], answers [n], lengths."""
    texts = [t for s in samples for t in s["texts"]]
    golds = [str(p["answer"]) for p, s in zip(problems, samples) for _ in s["texts"]]
    if scorer == "math_verify_eval":
        fmt = BENCHMARK_GOLD_FORMAT.get(benchmark.split(":")[0], "latex")
        sc = rewards.eval_score_batch(texts, golds, gold_format=fmt, workers=workers, timeout_s=timeout_s)
        correct, answers, unverified = sc.correct, sc.answers, sc.unverified
    else:
        rew, unverified = rewards.score_rows(texts, golds, mode=scorer, workers=workers, timeout_s=timeout_s)
        correct = rew > 0.5
        ext = rewards.extract_lenient_answer if scorer == "math_verify_lenient" else rewards.extract_boxed_answer
        answers = [ext(t) for t in texts]
    out, k = [], 0
    for p, s in zip(problems, samples):
        n = len(s["texts"])
        out.append(dict(id=p.get("id"), question=p.get("question"), gold=str(p["answer"]),
                        correct=[bool(c) for c in correct[k:k + n]], answers=list(answers[k:k + n]),
                        unverified=int(np.sum(unverified[k:k + n])),
                        response_tokens=s["response_tokens"], thinking_tokens=s["thinking_tokens"],
                        soft_steps=s["soft_steps"], sample_text=s["texts"][0] if s["texts"] else ""))
        k += n
    return out


def evaluate(engine: RolloutEngine, tokenizer, benchmarks: dict[str, Sequence[dict]], *, n: int, batch_size: int,
             key, model=None, scorer: str = "math_verify_eval", workers: int | None = None,
             timeout_s: float = 5.0, progress=None) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Generate and score every benchmark; returns (per-benchmark records, timing info)."""
    results, timing = {}, {}
    for name, problems in benchmarks.items():
        t0 = time.time()
        samples = generate_samples(engine, tokenizer, problems, n=n, batch_size=batch_size,
                                   key=jax.random.fold_in(key, zlib.crc32(name.encode()) % (2**31)), model=model, progress=progress)
        t1 = time.time()
        results[name] = score_samples(problems, samples, benchmark=name, scorer=scorer, workers=workers,
                                      timeout_s=timeout_s)
        timing[name] = {"generate_s": t1 - t0, "score_s": time.time() - t1}
    return results, timing
