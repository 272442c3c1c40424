"""Token-budget micro-batches in the trainer: the same loss, metrics and gradients as one padded batch (SofT-GRPO
with soft and discrete rows mixed, and GRPO), on one device and on a mesh, with each row's prompt in the row or
shared (each distinct prompt of a micro-batch computed once); and a training run with
``rl.max_tokens_per_micro_batch`` resumes to the uninterrupted run's metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import make_hf_model
from softgrpo_jax import load_pretrained
from softgrpo_jax.config import base_config, loss_config
from softgrpo_jax.distributed import make_mesh
from softgrpo_jax.rl.batching import gather_prefix_micro_batches, plan_prefix_micro_batches, prompt_ids
from softgrpo_jax.rl.objective import group_advantages, loss_denominator
from softgrpo_jax.rl.trainer import PolicyState, rollout_to_batch, split_micro, token_budget_groups
from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [8, 9], [10, 11, 12, 13, 14]]
# plain SGD with a large step: the parameter change is -LR x the gradient, far larger than the parameters, so the
# float32 difference new - old carries the gradient to float32 precision (with lr 1 it would be rounded to the
# parameters' ulp)
LR = 1e6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("m"))
    make_hf_model(d, "qwen2", seed=5, vocab_size=64)
    return d


def _batch(model_dir, modes):
    """A rollout of 8 rows with ragged prompt and response lengths (per-row budgets cut some rows short)."""
    model = load_pretrained(model_dir)
    eng = RolloutEngine(model, SamplingConfig(mode="gumbel", max_new_tokens=12, top_k=5, top_p=0.9), pad_id=0)
    r = eng.generate(PROMPTS, jax.random.key(11), n=2, modes=modes)
    batch = rollout_to_batch(r, np.asarray(group_advantages(jnp.asarray(np.arange(8.0) % 3), 2)))
    # ragged responses: cut rows to different lengths (as EOS would), so micro-batches get different buckets
    cut = np.array([12, 3, 9, 1, 12, 6, 2, 10])
    P = np.asarray(r.prompt_tokens).shape[1]
    for b in range(8):
        batch["attention_mask"][b, P + cut[b]:] = False
        batch["loss_mask"][b, P + cut[b]:] = False
    return batch, P


def _ref_from(old, tokens):
    """A reference log-prob that differs from the policy's, as a function of each token (so it travels with it
    into any micro-batch layout)."""
    return old + 0.05 * jnp.cos(1.3 * tokens.astype(jnp.float32))


def _padded(model_dir, batch, mesh=None):
    pol = PolicyState(load_pretrained(model_dir, mesh=mesh), optax.sgd(LR), loss_config(base_config().rl), mesh)
    mb = pol.put(split_micro(batch, 1))
    old = pol.logprobs(pol.params, mb)
    m = pol.update(mb, old, _ref_from(old, mb["tokens"]))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(pol.params)}, jax.device_get(m)


def _budget(model_dir, batch, max_tokens, n_dev=1, mesh=None, prompt_width=None):
    cfg = loss_config(base_config().rl)
    pol = PolicyState(load_pretrained(model_dir, mesh=mesh), optax.sgd(LR), cfg, mesh)
    if prompt_width:  # shared prompts, whatever plan_token_budget would choose for prompts this short
        plans = plan_prefix_micro_batches(*prompt_ids(batch, prompt_width), max_tokens, n_dev, granule=8)
        groups = [gather_prefix_micro_batches(batch, p, prompt_width) for p in plans]
    else:
        groups = token_budget_groups(batch, max_tokens, n_dev, granule=8)
    assert sum(int(g["loss_mask"].sum()) for g in groups) == int(batch["loss_mask"].sum())
    if prompt_width:  # micro-batches whose rows continue fewer prompts than they are: a prompt computed once
        assert all(g["prompt_tokens"].shape[1] < g["tokens"].shape[1] for g in groups)
        assert sum(g["tokens"].shape[0] for g in groups) >= (2 if n_dev == 1 else 1)
    else:
        assert len(groups) >= 2 and len({g["tokens"].shape[2] for g in groups}) >= 2  # several shapes
    args = []
    for g in groups:
        mb = pol.put(g)
        old = pol.logprobs(pol.params, mb)
        args.append((mb, old, _ref_from(old, mb["tokens"])))
    m = pol.update_groups(args, loss_denominator(jnp.asarray(batch["loss_mask"]), cfg))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(pol.params)}, jax.device_get(m)


@pytest.mark.parametrize("share", [False, True], ids=["rows", "shared_prompts"])
@pytest.mark.parametrize("arm,modes", [("softgrpo", ["gumbel", "discrete"] * 4), ("grpo", ["discrete"] * 8)])
def test_token_budget_equals_one_padded_batch(model_dir, arm, modes, share):
    batch, P = _batch(model_dir, modes)
    if arm == "softgrpo":
        assert batch["soft_mask"].any() and (batch["loss_mask"] & ~batch["soft_mask"]).any()
    p1, m1 = _padded(model_dir, batch)
    p2, m2 = _budget(model_dir, batch, max_tokens=48, prompt_width=P if share else None)
    base = {"/".join(map(str, k)): np.asarray(v) for k, v in
            nnx.to_flat_state(nnx.state(load_pretrained(model_dir)))}
    assert float(m1["grad_norm"]) > 0
    for k in ("loss", "pg_loss", "kl_loss", "grad_norm", "tokens", "ratio_mean", "logprob", "kl_token"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    worst = 0.0
    for k in p1:
        d1, d2 = ((p[k].astype(np.float64) - base[k]) / LR for p in (p1, p2))  # the gradients
        worst = max(worst, np.linalg.norm(d2 - d1) / max(np.linalg.norm(d1), 1e-12))
    assert worst <= 1e-5, worst  # float32 summation order only
    assert any(np.abs(p1[k] - base[k]).max() > 0 for k in p1)


@pytest.mark.parametrize("share", [False, True], ids=["rows", "shared_prompts"])
def test_token_budget_on_a_mesh_equals_one_device(model_dir, share):
    batch, P = _batch(model_dir, ["gumbel", "discrete"] * 4)
    p1, m1 = _padded(model_dir, batch)
    mesh = make_mesh((2, 2, 2))
    # (with shared prompts a budget that puts rows of one prompt on different devices)
    p2, m2 = _budget(model_dir, batch, max_tokens=40 if share else 24, n_dev=4, mesh=mesh,
                     prompt_width=P if share else None)
    base = {"/".join(map(str, k)): np.asarray(v) for k, v in
            nnx.to_flat_state(nnx.state(load_pretrained(model_dir)))}
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for k in p1:
        d1, d2 = ((p[k].astype(np.float64) - base[k]) / LR for p in (p1, p2))
        assert np.linalg.norm(d2 - d1) <= 1e-5 * np.linalg.norm(d1), k
