"""Trainer: learning on a toy reward (GRPO and SofT-GRPO), exact micro-batch accumulation, sharded == unsharded
update, the reference stays frozen, and an interrupted run resumes to the uninterrupted run's metrics."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import make_hf_model, make_tiny_smollm_dir
from softgrpo_jax import load_pretrained
from softgrpo_jax.config import ConfigError, get_config, loss_config, base_config
from softgrpo_jax.distributed import make_mesh
from softgrpo_jax.rl.objective import group_advantages
from softgrpo_jax.rl.trainer import PolicyState, make_optimizer, rollout_to_batch, split_micro
from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("m"))
    make_hf_model(d, "qwen2", seed=5, vocab_size=64)
    return d


def _even_reward(r):
    toks, mask = np.asarray(r.tokens), np.asarray(r.response_mask)
    return ((toks % 2 == 0) & mask).sum(1) / np.maximum(mask.sum(1), 1)


def _run_toy(model_dir, mode, steps, lr, mesh=None, seed=0, log=None):
    """``steps`` GRPO (``mode="discrete"``) or SofT-GRPO steps on the toy reward; ``log`` (a list) collects each
    step's batch and update metrics."""
    model = load_pretrained(model_dir, mesh=mesh)
    rl = base_config().rl
    lcfg = loss_config(rl, noise="gumbel")
    pol = PolicyState(model, make_optimizer(lr), lcfg, mesh)
    eng = RolloutEngine(model, SamplingConfig(mode=mode, max_new_tokens=8, top_k=5, tau=0.5), pad_id=0, mesh=mesh)
    rewards = []
    for s in range(steps):
        r = eng.generate(PROMPTS, jax.random.key(1000 * seed + s), n=4, model=pol.model)
        rew = _even_reward(r)
        rewards.append(rew.mean())
        batch = rollout_to_batch(r, np.asarray(group_advantages(jnp.asarray(rew), 4)))
        mb = pol.put(split_micro(batch, 2))
        old = pol.logprobs(pol.params, mb)
        ref = pol.logprobs(pol.ref_params, mb)
        m = pol.update(mb, old, ref)
        if log is not None:
            log.append((batch, jax.device_get(m)))
    return np.asarray(rewards), pol


@pytest.mark.parametrize("mode", ["discrete", "gumbel"])
def test_learning_raises_reward(model_dir, mode):
    rewards, pol = _run_toy(model_dir, mode, steps=12, lr=3e-2)
    first, last = rewards[:3].mean(), rewards[-3:].mean()
    assert last > first + 0.2, rewards
    # the reference never moves
    ref0 = nnx.state(load_pretrained(model_dir))
    for a, b in zip(jax.tree.leaves(pol.ref_params), jax.tree.leaves(ref0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _one_batch(model_dir, mode="gumbel"):
    model = load_pretrained(model_dir)
    eng = RolloutEngine(model, SamplingConfig(mode=mode, max_new_tokens=8), pad_id=0)
    r = eng.generate(PROMPTS, jax.random.key(3), n=2, modes=["gumbel", "discrete"] * 4)
    rew = np.arange(8, dtype=np.float32) % 3
    # the rollout as it is: its slots whose noise was clamped sit on the clip boundary at this policy, and the
    # clamped record (not float rounding) decides their gradient, so the comparisons below are well-posed
    return rollout_to_batch(r, np.asarray(group_advantages(jnp.asarray(rew), 2)))


def _update_params(model_dir, batch, n_micro, mesh=None):
    """One update with plain SGD (lr 1): the parameter change *is* the accumulated gradient (Adam's first step,
    g / |g|, would amplify rounding in near-zero gradients)."""
    import optax

    model = load_pretrained(model_dir, mesh=mesh)
    pol = PolicyState(model, optax.sgd(1.0), loss_config(base_config().rl), mesh)
    mb = pol.put(split_micro(batch, n_micro))
    old = pol.logprobs(pol.params, mb)
    ref = pol.logprobs(pol.params, mb) + 0.05 * jnp.asarray(np.random.RandomState(0).randn(*old.shape))
    m = pol.update(mb, old, ref)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(pol.params)}, jax.device_get(m)


def test_micro_batch_accumulation_equals_big_batch(model_dir):
    batch = _one_batch(model_dir)
    p1, m1 = _update_params(model_dir, batch, 1)
    p4, m4 = _update_params(model_dir, batch, 4)
    assert float(m1["grad_norm"]) > 0
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-4, atol=1e-7)
    for k in p1:
        np.testing.assert_allclose(p4[k], p1[k], rtol=1e-4, atol=1e-7, err_msg=k)
    base = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(load_pretrained(model_dir)))}
    assert any(not np.allclose(base[k], p1[k]) for k in p1)  # the update did move the params


def test_sharded_update_equals_unsharded(model_dir):
    batch = _one_batch(model_dir)
    p1, m1 = _update_params(model_dir, batch, 2)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = make_mesh(shape)
        n_dp = mesh.shape["data"] * mesh.shape["fsdp"]
        ps, ms = _update_params(model_dir, batch, 8 // n_dp, mesh=mesh)
        np.testing.assert_allclose(float(ms["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
        for k in p1:
            np.testing.assert_allclose(ps[k], p1[k], rtol=1e-4, atol=1e-7, err_msg=f"{shape} {k}")


@pytest.mark.parametrize("mode", ["discrete", "gumbel"])
def test_steps_on_one_and_eight_devices_agree(model_dir, mode):
    """Three GRPO / SofT-GRPO steps (rollout, update, next rollout from the updated policy) on one device and on a
    (2, 4, 1) mesh, from real rollouts (no slot moved off the clip): identical rollouts at every step, gradient
    norms and parameters within float32 summation order. For SofT-GRPO this needs the clamped record: at the
    rollout policy a clamped slot's z sits on the clip boundary, where each device count's rounding would pick its
    own gradient."""
    one, eight = [], []
    _, p1 = _run_toy(model_dir, mode, steps=3, lr=1e-3, log=one)
    _, p8 = _run_toy(model_dir, mode, steps=3, lr=1e-3, mesh=make_mesh((2, 4, 1)), log=eight)
    for s, ((b1, m1), (b8, m8)) in enumerate(zip(one, eight)):
        for k in ("tokens", "topk_ids", "soft_mask", "topk_kept", "topk_clamped"):
            np.testing.assert_array_equal(b8[k], b1[k], err_msg=f"step {s} {k}")
        np.testing.assert_allclose(b8["topk_ytil"], b1["topk_ytil"], atol=1e-5, err_msg=f"step {s}")
        assert float(m1["grad_norm"]) > 0
        np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4, err_msg=f"step {s}")
    if mode == "gumbel":  # soft targets on the clip boundary were scored
        b = one[0][0]
        assert (b["topk_clamped"] & b["soft_mask"][..., None] & b["topk_kept"]).sum() >= 5
    # the parameters' total change, tensor by tensor (Adam's g / sqrt(v) turns rounding in near-zero gradient
    # entries into lr-sized steps, so single entries are not compared)
    f0, f1, f8 = ({"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(p)} for p in (
        nnx.state(load_pretrained(model_dir)), p1.params, p8.params))
    for k in f0:
        d1, d8 = f1[k] - f0[k], f8[k] - f0[k]
        assert np.linalg.norm(d8 - d1) <= 1e-3 * np.linalg.norm(d1), (k, np.linalg.norm(d8 - d1) / np.linalg.norm(d1))


def test_update_and_logprobs_follow_ynn_setting(model_dir):
    """The update and log-prob functions compile with softgrpo_jax.xla_options' setting for their mesh's backend
    (YNNPACK dot fusions off / on) and compute the same log-probs and SGD update either way."""
    import optax

    from softgrpo_jax.ops.tuning import use_tuning
    from helpers import expect_ynn

    batch = _one_batch(model_dir)
    out = {}
    for mode in ("off", "on"):
        with use_tuning(ynn_dots=mode):
            pol = PolicyState(load_pretrained(model_dir), optax.sgd(1.0), loss_config(base_config().rl), None)
            mb = pol.put(split_micro(batch, 2))
            assert ("ynn_fusion" in pol.logprob_fn.lower(pol.params, mb).compile().as_text()) == expect_ynn(mode)
            old = pol.logprobs(pol.params, mb)
            before = jax.tree.map(np.asarray, pol.params)
            pol.update(mb, old, old)
            fn = pol.update_fn(int(mb["tokens"].shape[0]))
            text = fn.lower(pol.params, pol.opt_state, mb, old, old).compile().as_text()
            assert ("ynn_fusion" in text) == expect_ynn(mode)
            out[mode] = np.asarray(old), [np.asarray(b) - a for a, b in zip(jax.tree.leaves(before),
                                                                            jax.tree.leaves(pol.params))]
    np.testing.assert_allclose(out["off"][0], out["on"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(out["off"][1], out["on"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 * max(1.0, np.abs(b).max()))
    assert max(np.abs(d).max() for d in out["on"][1]) > 0


def test_nonfinite_gradient_skips_update(model_dir):
    batch = _one_batch(model_dir)
    batch["advantages"] = batch["advantages"].copy()
    batch["advantages"][0] = np.inf
    model = load_pretrained(model_dir)
    pol = PolicyState(model, make_optimizer(1e-2), loss_config(base_config().rl), None)
    before = jax.tree.map(np.asarray, pol.params)
    mb = pol.put(split_micro(batch, 2))
    old = pol.logprobs(pol.params, mb)
    m = jax.device_get(pol.update(mb, old, old))
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["grad_norm"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(pol.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert int(jax.device_get(pol.opt_state[1][0].count)) == 0  # adam state untouched
    # any optax transformation drives the update (it passes grad_norm=, which a plain one like optax.scale must not see)
    import optax

    pol = PolicyState(load_pretrained(model_dir), optax.scale(-1e-2), loss_config(base_config().rl), None)
    batch["advantages"][0] = 1.0
    mb = pol.put(split_micro(batch, 2))
    old = pol.logprobs(pol.params, mb)
    m = jax.device_get(pol.update(mb, old, old))
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["grad_norm"]))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(pol.params)))


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("scale", [0.05, 3.0])  # global norm below / above the clip
def test_clip_and_adamw_against_numpy(scale):
    """make_optimizer's step against a NumPy float64 AdamW after torch's clip_grad_norm_ (the seed's): gradients
    times min(1, max_norm / (norm + 1e-6)), decoupled weight decay; the same with the norm passed in; and the
    optimizer state has optax's structure (checkpoints written before the custom clip still restore)."""
    import optax

    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    lr, b1, b2, eps, wd, clip = 1e-2, 0.9, 0.999, 1e-8, 0.01, 1.0
    tx = make_optimizer(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, grad_clip=clip)
    state = tx.init(params)
    ref_state = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(optax.constant_schedule(lr))).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    p_np = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p_np.items()}
    v = {k: np.zeros_like(x) for k, x in p_np.items()}
    p_given, state_given = params, state
    for t in range(1, 4):
        g = {k: rng.standard_normal(x.shape) * scale for k, x in p_np.items()}
        gj = {k: jnp.asarray(x, jnp.float32) for k, x in g.items()}
        u, state = tx.update(gj, state, params)
        params = optax.apply_updates(params, u)
        u2, state_given = tx.update(gj, state_given, p_given, grad_norm=optax.tree.norm(gj))
        p_given = optax.apply_updates(p_given, u2)
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        c = min(1.0, clip / (norm + 1e-6))
        assert (c < 1.0) == (scale > 1.0)
        for k in p_np:
            gk = g[k] * c
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk ** 2
            step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            p_np[k] = p_np[k] - lr * (step + wd * p_np[k])
        for k in p_np:
            np.testing.assert_allclose(np.asarray(params[k]), p_np[k], rtol=0, atol=2e-6)
            np.testing.assert_array_equal(np.asarray(p_given[k]), np.asarray(params[k]))
    # torch's 1e-6 in the denominator: a gradient of norm 1e-6 against max_norm 1e-6 is halved (optax: unchanged)
    from softgrpo_jax.rl.trainer import clip_by_global_norm

    g = {"w": jnp.asarray([[6e-7, 8e-7]], jnp.float32)}
    out, _ = clip_by_global_norm(1e-6).update(g, optax.EmptyState())
    np.testing.assert_allclose(np.asarray(out["w"]), [[3e-7, 4e-7]], rtol=1e-5)


def test_config_overrides_and_errors():
    cfg = get_config("configs/deepscaler_7b.py", ["--config.rl.group_size=4", "--config.rollout.tau=0.25",
                                                   "--config.model.remat=false"])
    assert cfg.rl.group_size == 4 and cfg.rollout.tau == 0.25 and cfg.model.remat is False
    assert cfg.rl.micro_batch_size == 1 and cfg.rl.train_batch_size == 64 and cfg.rollout.top_k == 5
    with pytest.raises(ConfigError, match=r"rl\.group_size") as e:
        get_config("configs/deepscaler_1p5b.py", ["--config.rl.grup_size=4"])
    assert "Valid keys" in str(e.value) and "optim.lr" in str(e.value)
    with pytest.raises(ConfigError, match="expected an int"):
        get_config("configs/deepscaler_1p5b.py", ["--config.rl.group_size=four"])
    with pytest.raises(ConfigError, match="not found"):
        get_config("configs/nope.py")


@pytest.mark.parametrize("name", ["deepscaler_1p5b", "deepscaler_7b", "deepscaler_llama3b", "grpo_deepscaler_1p5b",
                                  "grpo_deepscaler_7b", "grpo_deepscaler_llama3b", "eval_softgrpo_gumbel",
                                  "eval_grpo_soft", "eval_discrete", "demo_smollm2", "demo_smollm2_smoke"])
def test_presets_load(name):
    cfg = get_config(f"configs/{name}.py")
    if name.startswith("deepscaler") or name.startswith("grpo"):
        # docs/algorithm.md, "Settings of the original runs", setting by setting
        assert (cfg.rl.group_size, cfg.rl.train_batch_size, cfg.rl.mini_batch_size) == (8, 64, 32)
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-6, 0.01, 1.0)
        assert (cfg.rl.kl_coef, cfg.rl.kl_type, cfg.rl.clip_ratio_c) == (0.001, "low_var_kl", 3.0)
        assert (cfg.rollout.top_k, cfg.rollout.top_p, cfg.rollout.max_topk) == (5, 0.95, 5)
        assert cfg.rollout.max_new_tokens == 8192 and cfg.data.max_prompt_length == 1024
        assert cfg.rollout.mode == ("discrete" if name.startswith("grpo") else "gumbel")
        assert cfg.rollout.tau == 0.1


def test_demo_config_is_one_recipe_on_every_cpu(tmp_path, monkeypatch):
    """The demo is one recipe (bf16, remat, token-budget micro-batches) whatever the CPU, an ISA cap included: its
    float32 runs on CPUs without bf16 units did not learn (benchmarks/RESULTS.md); the smoke setting keeps fixed rows.
    Only its length differs: 12 steps where a CPU without bf16 units (or XLA's AVX2 cap) makes a step ~2x dearer, 24
    elsewhere, and 24 whenever JAX computes on an accelerator, whatever the host CPU."""
    import softgrpo_jax.models.config as mc

    real = mc.cpu_flags
    for cpu, plain in (("avx512_bf16", 24), ("", 12)):
        info = tmp_path / f"cpuinfo{cpu}"
        info.write_text(f"flags\t\t: fpu avx avx2 fma avx512f avx512_vnni {cpu}\n")
        monkeypatch.setattr(mc, "cpu_flags", lambda *a, _i=str(info), **k: real(_i, **k))
        seen = []
        for platforms, xla_flags in (("cpu", ""), ("cpu", "--xla_force_host_platform_device_count=8 "
                                                           "--xla_cpu_max_isa=AVX2"), ("cuda", "")):
            monkeypatch.setenv("JAX_PLATFORMS", platforms)
            monkeypatch.setenv("XLA_FLAGS", xla_flags)
            c = get_config("configs/demo_smollm2.py")
            seen.append((c.model.compute_dtype, c.model.remat, c.rl.train_batch_size,
                         c.rl.max_tokens_per_micro_batch, c.trainer.total_steps))
            assert get_config("configs/demo_smollm2.py", ["--config.trainer.total_steps=5"]).trainer.total_steps == 5
        assert seen == [("bfloat16", True, 4, 4096, n) for n in (plain, 12, 24)], (cpu, seen)
    from softgrpo_jax.distributed import runs_on_cpu

    assert runs_on_cpu({"JAX_PLATFORMS": "cpu"}) and not runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert runs_on_cpu({}) == (jax.default_backend() == "cpu")  # unset: judged from plugins and device nodes
    # ("auto" would have parted them: bf16 natively, float32 under the cap)
    info = tmp_path / "cpuinfoavx512_bf16"
    assert [mc.resolve_compute_dtype("auto", backend="cpu", flags=real(str(info), xla_flags=f))
            for f in ("", "--xla_cpu_max_isa=AVX2")] == ["bfloat16", "float32"]
    assert get_config("configs/demo_smollm2_smoke.py").rl.max_tokens_per_micro_batch == 0


# ------------------------------------------------------------------------------------------ resume
def _run_cfg(model_path, out, steps, extra=()):
    return get_config("configs/demo_smollm2_smoke.py", [
        f"--config.model.path={model_path}", f"--config.trainer.output_dir={out}",
        f"--config.trainer.total_steps={steps}", "--config.trainer.save_every=1", "--config.trainer.eval_before=false",
        "--config.trainer.export_hf=false", "--config.trainer.progress=false", "--config.optim.lr=1e-2",
        "--config.data.eval_limit=2", "--config.eval.n_samples=1", "--config.eval.ks=(1,)",
        "--config.trainer.mesh=(1,1,-1)", "--config.reward.on_truncation=score", *extra])


def _letter_reward(texts, golds):
    return np.asarray([t.count("e") / max(len(t), 1) * 10 for t in texts], np.float32)


@pytest.mark.parametrize("extra", [(), ("--config.rl.max_tokens_per_micro_batch=256",),
                                   ("--config.rl.max_tokens_per_micro_batch=1024", "--config.rl.share_prompt=true",
                                    "--config.rl.group_size=8")],
                         ids=["rows", "tokens", "shared_prompts"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reads of a damaged step
def test_resume_reproduces_uninterrupted_metrics(tmp_path, extra):
    from softgrpo_jax.train import Run

    mdir = make_tiny_smollm_dir(str(tmp_path / "m"))
    full = Run(_run_cfg(mdir, str(tmp_path / "full"), 3, extra), reward_fn=_letter_reward).train()
    train_full = [m for m in full["metrics"] if m["kind"] == "train"]
    assert len(train_full) == 3 and any(m["grad_norm"] > 0 for m in train_full)

    class Crash(Exception):
        pass

    if len(extra) == 1:  # token-budget micro-batches: less padding than rows padded to the longest
        assert all(m["train_padding_fraction"] < 0.5 for m in train_full), train_full
    shared = [m["train_shared_prompt_fraction"] for m in train_full]
    assert all(f > 0 for f in shared) if len(extra) > 1 else not any(shared), shared
    run = Run(_run_cfg(mdir, str(tmp_path / "cut"), 3, extra), reward_fn=_letter_reward)
    orig = run.train_step

    def crashing(step):
        if step == 2:
            raise Crash("killed")
        return orig(step)

    run.train_step = crashing
    with pytest.raises(Crash):
        run.train()
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["1", "2"]
    resumed = Run(_run_cfg(mdir, str(tmp_path / "cut"), 3, extra), reward_fn=_letter_reward).train()
    train_cut = [m for m in resumed["metrics"] if m["kind"] == "train"]
    assert [m["step"] for m in train_cut] == [1, 2, 3]
    skip = ("time", "tokens_per_s")
    for a, b in zip(train_full, train_cut):
        for k, v in a.items():
            if not any(s in k for s in skip):
                assert b[k] == v, (a["step"], k, v, b[k])
    if len(extra) == 1:  # the token-budget shapes compiled so far travel with the checkpoints, so resumed plans
        from softgrpo_jax.rl.trainer import Checkpointer  # are the unbroken run's

        shapes = [Checkpointer(str(tmp_path / d / "checkpoints")).read_meta(3)["micro_batch_shapes"]
                  for d in ("full", "cut")]
        assert shapes[0] and shapes[0] == shapes[1], shapes
        again = Run(_run_cfg(mdir, str(tmp_path / "cut"), 3, extra), reward_fn=_letter_reward)
        assert again.maybe_resume() == 3 and again.micro_shapes == {tuple(x) for x in shapes[1]}
    if extra:
        return
    _resume_refusals(tmp_path, mdir, str(tmp_path / "cut"))


def _resume_refusals(tmp_path, mdir, out):
    """A checkpoint is resumed only by the run it belongs to, and only when it can be read; every refusal is one
    line that says what to do, and leaves the checkpoints (and the metrics) as they were."""
    import shutil

    from softgrpo_jax.checkpoint import CheckpointError
    from softgrpo_jax.train import Run

    ck = os.path.join(out, "checkpoints")

    def resume(path, steps=3, extra=(), model=mdir):
        return Run(_run_cfg(model, path, steps, extra)).maybe_resume()

    # settings that shape what the run learns: refused, naming them; how it computes may change
    with pytest.raises(CheckpointError, match=r"other settings: optim.lr 0.01 -> 0.001; rl.algorithm 'softgrpo' "
                                              r"-> 'grpo'.*trainer.resume_changed=true"):
        resume(out, extra=("--config.optim.lr=1e-3", "--config.rl.algorithm=grpo"))
    with pytest.raises(CheckpointError, match=r"holds step 3, past trainer.total_steps=2"):
        resume(out, steps=2)
    assert resume(out, steps=4, extra=("--config.rl.micro_batch_size=1", "--config.trainer.progress=true")) == 3
    # an incompatible checkpoint (another model's shapes): with the model's path changed on purpose, still refused
    other = make_tiny_smollm_dir(str(tmp_path / "m2"), hidden_size=48)
    with pytest.raises(CheckpointError, match="other settings: model.path"):
        resume(out, model=other)
    with pytest.raises(ValueError, match="does not match"):
        resume(out, model=other, extra=("--config.trainer.resume_changed=true",))
    assert sorted(os.listdir(ck)) == ["2", "3"]
    # a damaged latest step: named, with the earlier step to resume from
    bad = str(tmp_path / "damaged")
    shutil.copytree(out, bad)
    shutil.rmtree(os.path.join(bad, "checkpoints", "3", "opt_state"))
    with pytest.raises(CheckpointError, match=r"step 3 .* cannot be read \(its opt_state is missing\); move "
                                              r".*/3 out of .* to resume from step 2"):
        resume(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    data = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(bad, "checkpoints", "3", "params")) for f in fs
            if os.path.basename(r) == "d"]  # the array data files (orbax's OCDBT layout)
    assert data
    for f in data:  # cut short, as by a full disk or a copy that stopped
        os.truncate(f, 10)
    with pytest.raises(CheckpointError, match=r"step 3 .* cannot be read .*resume from step 2"):
        resume(bad)
    # no checkpoint: an earlier start's metrics are kept beside; a finished run's export is never trained over
    shutil.rmtree(os.path.join(bad, "checkpoints"))
    before = open(os.path.join(bad, "metrics.jsonl")).read()
    os.makedirs(os.path.join(bad, "hf_export"))
    open(os.path.join(bad, "hf_export", "config.json"), "w").write("{}")
    with pytest.raises(CheckpointError, match=r"holds a trained run \(3 steps in metrics.jsonl.*no checkpoint"):
        resume(bad)
    shutil.rmtree(os.path.join(bad, "hf_export"))
    with open(os.path.join(bad, "metrics.jsonl"), "a") as f:
        f.write("[1, 2]\n")  # not an object: skipped like a line cut by a kill
    assert resume(bad) == 0
    assert not os.path.exists(os.path.join(bad, "metrics.jsonl"))
    assert open(os.path.join(bad, "metrics.jsonl.1")).read() == before + "[1, 2]\n"
    assert sorted(os.listdir(ck)) == ["2", "3"]


def test_one_run_at_a_time_per_output_folder(tmp_path, monkeypatch, capsys):
    """A second run on a folder a run is writing would save over its checkpoints: refused, naming the holder; the
    folder is free again once the first ends, however it ends."""
    from softgrpo_jax.checkpoint import CheckpointError
    from softgrpo_jax.train import _output_lock

    with _output_lock(str(tmp_path), "trainer.output_dir='x'"):
        with pytest.raises(CheckpointError, match=rf"'x' is in use by another run \(process {os.getpid()} on "):
            with _output_lock(str(tmp_path), "trainer.output_dir='x'"):
                pass
    with pytest.raises(RuntimeError):
        with _output_lock(str(tmp_path), "x"):
            raise RuntimeError("a crash")
    with _output_lock(str(tmp_path), "x"):
        pass
    # a file system that takes no locks (Lustre noflock, NFS without lockd): the run goes on, with a note
    import errno
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with _output_lock(str(tmp_path), "x"):
        with _output_lock(str(tmp_path), "x"):
            pass
    r = capsys.readouterr()
    assert "takes no file locks" in r.err + r.out


def test_resume_differences_by_what_the_settings_mean(tmp_path, monkeypatch):
    """Settings compare by meaning: a model path by the folder it names (a relative path stored by a run started
    elsewhere included), the step count only where no schedule is laid out over it."""
    import json

    from softgrpo_jax.config import resolved_path, resume_differences

    SMOKE_CFG = "demo_smollm2_smoke"  # (the bundled config by name, wherever the working directory is)
    (tmp_path / "a" / "models" / "base").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    saved = json.loads(get_config(SMOKE_CFG, ["--config.model.path=models/base"]).to_json_best_effort())
    paths = {"model.path": resolved_path("models/base")}
    monkeypatch.chdir(tmp_path / "b")
    here = str(tmp_path / "a" / "models" / "base")
    assert resume_differences(saved, get_config(SMOKE_CFG, [f"--config.model.path={here}"]), paths) == []
    assert resume_differences(saved, get_config(SMOKE_CFG, [f"--config.model.path={here}"])) == ["model.path"]
    assert resume_differences(saved, get_config(SMOKE_CFG, [f"--config.model.path={tmp_path / 'b'}"]),
                              paths) == ["model.path"]
    more = [f"--config.model.path={here}", "--config.trainer.total_steps=50", "--config.rl.micro_batch_size=1"]
    assert resume_differences(saved, get_config(SMOKE_CFG, more), paths) == []
    cos = ["--config.optim.schedule=warmup_cosine", "--config.optim.warmup_steps=2"]
    saved_cos = json.loads(get_config(SMOKE_CFG, ["--config.model.path=models/base", *cos]).to_json_best_effort())
    assert resume_differences(saved_cos, get_config(SMOKE_CFG, more + cos), paths) == ["trainer.total_steps"]


def test_a_training_checkpoint_loads_as_a_model(tmp_path, capsys):
    """Every step a run kept is a model: load_pretrained / softgrpo eval / softgrpo convert take
    <output_dir>/checkpoints/<step>, the run's starting model with that step's weights, which equal the run's own
    Hugging Face export of the same step."""
    import shutil

    from softgrpo_jax import load_tokenizer
    from softgrpo_jax.checkpoint import CheckpointError
    from softgrpo_jax.checkpoint.api import detect_format
    from softgrpo_jax.cli import main
    from softgrpo_jax.train import Run

    def weights(path):
        leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(load_pretrained(path), nnx.Param)))
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves[0]}

    mdir = make_tiny_smollm_dir(str(tmp_path / "m"))
    out = tmp_path / "run"
    Run(_run_cfg(mdir, str(out), 2, ["--config.trainer.export_hf=true"]), reward_fn=_letter_reward).train()
    first, last = str(out / "checkpoints" / "1"), str(out / "checkpoints" / "2")
    assert detect_format(last) == "train"
    base, step1, step2, export = weights(mdir), weights(first), weights(last), weights(str(out / "hf_export"))
    assert step2.keys() == export.keys() == base.keys()
    for k in export:
        np.testing.assert_array_equal(step2[k], export[k], err_msg=k)
    assert any(not np.array_equal(base[k], step1[k]) for k in base)  # a trained step, not the starting model
    assert any(not np.array_equal(step1[k], step2[k]) for k in base)
    assert load_tokenizer(last).encode("12 + 7 =") == load_tokenizer(mdir).encode("12 + 7 =")
    assert main(["convert", last, str(tmp_path / "hf1")]) == 0
    converted = weights(str(tmp_path / "hf1"))
    for k in export:
        np.testing.assert_array_equal(converted[k], step2[k], err_msg=k)
    # of the starting model only its config and tokenizer are read (at 7B its weights are the dearest read): a step
    # still loads with them gone, and `softgrpo plan` reads the same architecture from the step as from the model
    from softgrpo_jax import plan as plan_lib
    from softgrpo_jax.checkpoint.api import model_config

    assert plan_lib.model_config(last) == plan_lib.model_config(mdir)
    for f in os.listdir(mdir):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(mdir, f))
    again = weights(last)
    for k in export:
        np.testing.assert_array_equal(again[k], step2[k], err_msg=k)
    assert model_config(last, compute_dtype="float32") == load_pretrained(last, compute_dtype="float32").config
    # the run's starting model moved away: one line naming it, nothing written
    shutil.move(mdir, str(tmp_path / "moved"))
    with pytest.raises(CheckpointError, match="started from"):
        load_pretrained(first)
    capsys.readouterr()
    assert main(["convert", first, str(tmp_path / "hf2")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("softgrpo: error:") and "started from" in err and "\n" not in err, err
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("extra", [(), ("--config.rl.max_tokens_per_micro_batch=256",)], ids=["rows", "tokens"])
def test_first_of_several_mini_batches_is_on_policy(tmp_path, extra):
    """Two updates per step: the first mini-batch is updated with the rollout's params, so rl.old_logprobs=auto takes
    its old log-probs from the update's own forward pass and scores only the second mini-batch's rows in the
    separate pass; training equals recomputing both (up to rounding)."""
    from softgrpo_jax.train import Run

    mdir = make_tiny_smollm_dir(str(tmp_path / "m"))
    out = {}
    for mode in ("recompute", "auto"):
        run = Run(_run_cfg(mdir, str(tmp_path / mode), 2, [f"--config.rl.old_logprobs={mode}",
                                                           "--config.rl.mini_batch_size=1", *extra]),
                  reward_fn=_letter_reward)
        old_rows = []
        orig = run.policy.logprobs

        def counted(params, mb, _o=orig, _run=run, _rows=old_rows):
            if params is not _run.policy.ref_params:
                _rows.append(int(np.prod(mb["attention_mask"].shape[:2])))  # micro-batches x rows
            return _o(params, mb)

        run.policy.logprobs = counted
        res = run.train()
        pol = run.policy  # compiled update programs: one per micro-batch shape, on- or off-policy alike
        programs = sum(f._cache_size() for f in [*pol._update_cache.values(), pol._accumulate_fn] if f is not None)
        out[mode] = ([m for m in res["metrics"] if m["kind"] == "train"], sum(old_rows), programs)
    (rec, n_rec, p_rec), (auto, n_auto, p_auto) = out["recompute"], out["auto"]
    assert n_rec == 2 * n_auto > 0, (n_rec, n_auto)  # 2 steps x 2 mini-batches of 2 rows, against the second only
    assert p_auto == p_rec >= 1, (p_auto, p_rec)
    assert any(m["grad_norm"] > 0 for m in rec)
    for a, b in zip(rec, auto):
        for k in ("loss", "pg_loss", "grad_norm", "reward_mean", "kl_token", "ratio_mean"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(m["ratio_mean"] != 1.0 for m in auto)  # the second mini-batch ran off-policy, with its old log-probs
    with pytest.raises(ValueError, match="old_logprobs"):  # at start-up, before any rollout
        Run(_run_cfg(mdir, str(tmp_path / "bad"), 1, ["--config.rl.old_logprobs=sometimes"]),
            reward_fn=_letter_reward)


def test_truncated_responses_can_score_zero(tmp_path):
    """reward.on_truncation=zero: a response that used the whole budget without a stop token gets reward 0 in
    training; score (the default) leaves the reward function's value; a bad value fails at start-up."""
    from softgrpo_jax.train import Run

    mdir = make_tiny_smollm_dir(str(tmp_path / "m"))
    ones = lambda texts, golds: np.ones(len(texts), np.float32)  # noqa: E731
    got = {}
    for mode in ("score", "zero"):
        res = Run(_run_cfg(mdir, str(tmp_path / mode), 1, [f"--config.reward.on_truncation={mode}"]),
                  reward_fn=ones).train()
        got[mode] = [m for m in res["metrics"] if m["kind"] == "train"][0]
    assert got["score"]["reward_mean"] == 1.0
    trunc = got["zero"]["truncated_fraction"]
    assert trunc > 0  # a tiny random model rarely emits its stop token
    np.testing.assert_allclose(got["zero"]["reward_mean"], 1.0 - trunc, atol=1e-6)
    assert got["zero"]["truncated_fraction"] == got["score"]["truncated_fraction"]  # same seed, same rollouts
    with pytest.raises(ValueError, match="on_truncation"):
        Run(_run_cfg(mdir, str(tmp_path / "bad"), 1, ["--config.reward.on_truncation=drop"]), reward_fn=ones)
