"""Rollout engine: one soft step against NumPy (docs/algorithm.md, "Rollout step"), cached decoding vs full forward, padding, sharding,
think-end switching, cold stop, EOS and max-length endings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_hf_model
from softgrpo_jax import load_pretrained
from softgrpo_jax.distributed import make_mesh
from softgrpo_jax.ops import soft_embed
from softgrpo_jax.sampling import GUMBEL, RolloutEngine, SamplingConfig, filter_sorted, step


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("m"))
    make_hf_model(d, "qwen2", seed=3)
    return load_pretrained(d)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


# ------------------------------------------------------------------------------------------ NumPy reference
def np_filter(p_sorted, top_k, top_p):
    p = p_sorted.copy()
    if top_k > 0:
        p[top_k:] = 0
    p = p / p.sum()
    before = np.cumsum(p) - p
    keep = before < top_p
    keep[0] = True
    p = np.where(keep, p, 0)
    return p / p.sum()


def np_soft_step(logits, E, cfg: SamplingConfig, noise_exp, slots=False):
    """docs/algorithm.md "Rollout step", one row: returns ids, ytil, y (sorted), the token and the next embedding (``slots``: then also the
    sorted noise g, which slots the filters kept and which slots' noise lies on or beyond the clip)."""
    lt = logits.astype(np.float64) / cfg.temperature
    p = np.exp(lt - lt.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    pf = np_filter(p[order], cfg.top_k, cfg.top_p)
    K = cfg.max_topk
    p_hat = pf[:K] / pf[:K].sum()
    ids = order[:K]
    g = np.clip(-np.log(noise_exp), -1.5, 3.0)
    ytil = np.log(p_hat + 1e-6) + cfg.noise_factor * g
    y = np.exp((ytil - ytil.max()) / cfg.tau)
    y /= y.sum()
    o = np.argsort(-ytil, kind="stable")  # == order by y, without float32 underflow ties
    ids, ytil, y = ids[o], ytil[o], y[o]
    emb = (y / y.sum()) @ E[ids]
    if slots:
        cg = cfg.noise_factor * g[o]
        return ids, ytil, y, ids[0], emb, g[o], pf[:K][o] > 0, (cg <= -1.5) | (cg >= 3.0)
    return ids, ytil, y, ids[0], emb


def _noise_for(key, K):
    k_noise, _ = jax.random.split(key)
    return np.asarray(jax.random.exponential(k_noise, (K,)), np.float64)


@pytest.mark.parametrize("K,top_k,top_p,tau", [(5, 5, 0.95, 0.1), (8, 12, 0.7, 0.5), (3, 0, 1.0, 1.0)])
def test_soft_step_matches_numpy(K, top_k, top_p, tau):
    rng = np.random.RandomState(K)
    B, V = 6, 300
    logits = rng.randn(B, V).astype(np.float32) * 3
    E = rng.randn(V, 16).astype(np.float32)
    cfg = SamplingConfig(mode="gumbel", max_topk=K, top_k=top_k, top_p=top_p, tau=tau, temperature=0.8)
    keys = jax.random.split(jax.random.key(7), B)
    out = step(cfg, jnp.asarray(logits), keys, jnp.full((B,), GUMBEL), jnp.ones((B,), bool))
    emb = np.asarray(soft_embed(jnp.asarray(E), out["ids"], out["weights"]))
    n_cut = n_clamped = 0
    for b in range(B):
        ids, ytil, y, tok, e, _, kept, clamped = np_soft_step(logits[b], E, cfg, _noise_for(keys[b], K), slots=True)
        np.testing.assert_array_equal(np.asarray(out["ids"][b]), ids)
        np.testing.assert_allclose(np.asarray(out["ytil"][b]), ytil, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["weights"][b]), y, rtol=1e-4, atol=1e-6)
        assert int(out["token"][b]) == tok
        np.testing.assert_allclose(emb[b], e, rtol=1e-4, atol=1e-5)
        assert bool(out["soft"][b])
        np.testing.assert_array_equal(np.asarray(out["kept"][b]), kept)
        np.testing.assert_array_equal(np.asarray(out["clamped"][b]), clamped)
        n_cut += int((~kept).sum())
        n_clamped += int(clamped.sum())
    if top_p < 0.9:
        assert n_cut > 0  # top-p did cut slots here, so the kept record is exercised
    assert n_clamped > 0 or K * B < 20


@pytest.mark.parametrize("noise_factor", [0.5, 2.0])
def test_clamped_record_follows_noise_factor(noise_factor):
    """A slot is recorded as clamped when the noise it received, noise_factor * g, lies on or beyond the trainer's
    clip [-1.5, 3] (with factor 0.5 never; with factor 2 also for unclamped g beyond -0.75 or 1.5)."""
    B, V, K = 64, 50, 5
    logits = np.random.RandomState(0).randn(B, V).astype(np.float32)
    cfg = SamplingConfig(mode="gumbel", max_topk=K, top_k=K, top_p=1.0, noise_factor=noise_factor)
    keys = jax.random.split(jax.random.key(2), B)
    out = step(cfg, jnp.asarray(logits), keys, jnp.full((B,), GUMBEL), jnp.ones((B,), bool))
    E = np.zeros((V, 1), np.float32)
    want = np.stack([np_soft_step(logits[b], E, cfg, _noise_for(keys[b], K), slots=True)[7] for b in range(B)])
    np.testing.assert_array_equal(np.asarray(out["clamped"]), want)
    assert want.any() == (noise_factor > 1)
    # plain soft rows and discrete rows record nothing clamped; discrete rows keep slot 0 only
    for mode, thinking in ((1, True), (0, False)):
        o = step(cfg, jnp.asarray(logits), keys, jnp.full((B,), mode), jnp.full((B,), thinking))
        assert not np.asarray(o["clamped"]).any()
        if mode == 0:
            np.testing.assert_array_equal(np.asarray(o["kept"]), np.eye(K, dtype=bool)[[0] * B])


def test_filter_sorted_matches_numpy():
    rng = np.random.RandomState(0)
    p = np.sort(rng.dirichlet(np.ones(40) * 0.3, size=5), axis=1)[:, ::-1]
    for tk, tp in [(5, 0.95), (0, 0.5), (30, 0.9), (1, 1.0)]:
        got = np.asarray(filter_sorted(jnp.asarray(p, jnp.float32), jnp.full((5,), tk), jnp.full((5,), tp), 0.0))
        for b in range(5):
            np.testing.assert_allclose(got[b], np_filter(p[b], tk, tp), atol=1e-6)


def test_discrete_rows_sample_from_filtered_distribution():
    """Discrete sampling frequencies follow the top-k/top-p-renormalised distribution."""
    V = 20
    logits = jnp.asarray(np.log(np.array([0.4, 0.3, 0.15, 0.1] + [0.05 / 16] * 16)), jnp.float32)
    cfg = SamplingConfig(mode="discrete", top_k=3, top_p=1.0, max_topk=2)
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    out = step(cfg, jnp.broadcast_to(logits, (n, V)), keys, jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool))
    counts = np.bincount(np.asarray(out["token"]), minlength=V) / n
    np.testing.assert_allclose(counts[:3], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)
    assert counts[3:].sum() == 0
    assert not np.asarray(out["soft"]).any()
    np.testing.assert_array_equal(np.asarray(out["ids"][:, 1:]), 0)
    np.testing.assert_allclose(np.asarray(out["logprob"]), np.asarray(jax.nn.log_softmax(logits))[np.asarray(
        out["token"])], rtol=1e-5)


# ------------------------------------------------------------------------------------------ engine
def _engine(model, **kw):
    end = kw.pop("think_end_ids", ())
    stops = kw.pop("stop_ids", ())
    return RolloutEngine(model, SamplingConfig(**kw), think_end_ids=end, stop_ids=stops, pad_id=0)


def test_cached_rollout_equals_full_forward(model):
    """Every stored soft step equals the NumPy soft step on logits of a full (uncached) forward over
    [prompt embeddings, previous soft embeddings]: the cache, the stored ids/ytil and the noise all agree."""
    cfg = dict(mode="gumbel", max_new_tokens=7, max_topk=4, top_k=6, top_p=0.9, tau=0.3)
    eng = _engine(model, **cfg)
    key = jax.random.key(1)
    r = eng.generate(PROMPTS[:2], key)
    E = np.asarray(model.embedding_table())
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(2))
    for b in range(2):
        p = np.asarray(r.prompt_tokens[b])[np.asarray(r.prompt_mask[b])]
        embs = [E[p]]
        for j in range(7):
            x = np.concatenate(embs, 0)[None]
            logits = np.asarray(model(inputs_embeds=jnp.asarray(x)))[0, -1]
            k = jax.random.fold_in(row_keys[b], j)
            ids, ytil, y, tok, e, _, kept, clamped = np_soft_step(logits, E, SamplingConfig(**cfg), _noise_for(k, 4),
                                                                  slots=True)
            np.testing.assert_array_equal(np.asarray(r.topk_ids[b, j]), ids)
            np.testing.assert_allclose(np.asarray(r.topk_ytil[b, j]), ytil, atol=2e-4)
            np.testing.assert_array_equal(np.asarray(r.topk_kept[b, j]), kept)
            np.testing.assert_array_equal(np.asarray(r.topk_clamped[b, j]), clamped)
            assert int(r.tokens[b, j]) == tok
            embs.append(e[None].astype(np.float32))
    assert np.asarray(r.soft_mask).all() and np.asarray(r.response_mask).all()


@pytest.mark.parametrize("mode", ["gumbel", "soft"])
def test_k1_equals_greedy(model, mode):
    steps = 10
    greedy = _engine(model, mode="discrete", top_k=1, max_topk=1, max_new_tokens=steps)
    soft = _engine(model, mode=mode, top_k=5, max_topk=1, max_new_tokens=steps)
    a = greedy.generate(PROMPTS, jax.random.key(0))
    b = soft.generate(PROMPTS, jax.random.key(99))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.asarray(b.soft_mask).all() and not np.asarray(a.soft_mask).any()


@pytest.mark.parametrize("mode", ["discrete", "gumbel"])
def test_padded_batch_equals_one_at_a_time(model, mode):
    eng = _engine(model, mode=mode, max_new_tokens=8)
    key = jax.random.key(5)
    r = eng.generate(PROMPTS, key)
    for i, p in enumerate(PROMPTS):
        s = eng.generate([p], key, row_offset=i)
        np.testing.assert_array_equal(np.asarray(s.tokens[0]), np.asarray(r.tokens[i]))
        np.testing.assert_array_equal(np.asarray(s.topk_ids[0]), np.asarray(r.topk_ids[i]))
        np.testing.assert_allclose(np.asarray(s.topk_ytil[0]), np.asarray(r.topk_ytil[i]), atol=1e-5)


def test_sharded_equals_unsharded(model):
    assert jax.device_count() == 8
    prompts = PROMPTS * 2
    key = jax.random.key(11)
    ref = _engine(model, mode="gumbel", max_new_tokens=6).generate(prompts, key, modes=["gumbel", "discrete"] * 4)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = make_mesh(shape)
        ms = load_pretrained_like(model, mesh)
        eng = RolloutEngine(ms, SamplingConfig(mode="gumbel", max_new_tokens=6), pad_id=0, mesh=mesh)
        r = eng.generate(prompts, key, modes=["gumbel", "discrete"] * 4)
        assert len(r.tokens.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(r.topk_ids), np.asarray(ref.topk_ids))
        np.testing.assert_allclose(np.asarray(r.topk_ytil), np.asarray(ref.topk_ytil), atol=1e-5)


def test_layouts_agree_and_bf16_rollouts(model):
    """The layer-scan and per-layer layouts decode the same rollout; a bf16 engine of the float32 model decodes
    with bf16 weights and a bf16 cache, and its prefill logits stay within bf16 rounding of float32's."""
    from softgrpo_jax.sampling.engine import prefill

    key = jax.random.key(21)
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=8)
    modes = ["gumbel", "discrete"] * 2
    outs = {}
    for layout in ("scan", "per_layer"):
        eng = RolloutEngine(model, cfg, pad_id=0, layout=layout)
        assert eng.per_layer == (layout == "per_layer")
        outs[layout] = eng.generate(PROMPTS, key, modes=modes)
    a, b = outs["scan"], outs["per_layer"]
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.topk_ids), np.asarray(b.topk_ids))
    np.testing.assert_allclose(np.asarray(a.topk_ytil), np.asarray(b.topk_ytil), atol=1e-5)

    e16 = RolloutEngine(model, cfg, pad_id=0, dtype="bfloat16")
    mcfg, params = e16.decode_params(model)
    assert mcfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    toks, mask = e16.prepare_prompts(PROMPTS)
    lg16, cache16 = prefill(mcfg, params, toks, mask, cache_len=toks.shape[1] + 4)
    f32cfg, p32 = RolloutEngine(model, cfg, pad_id=0).decode_params(model)
    lg32, _ = prefill(f32cfg, p32, toks, mask, cache_len=toks.shape[1] + 4)
    assert jax.tree.leaves(cache16["k"])[0].dtype == jnp.bfloat16
    err = np.abs(np.asarray(lg16) - np.asarray(lg32)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(lg32)).max(), err
    r16 = e16.generate(PROMPTS, key, modes=modes)
    assert r16.topk_ytil.dtype == jnp.float32 and np.isfinite(np.asarray(r16.topk_ytil)).all()
    assert np.asarray(r16.response_mask).all()
    with pytest.raises(ValueError, match="layout"):
        RolloutEngine(model, cfg, layout="rows")


def load_pretrained_like(model, mesh):
    from flax import nnx

    from softgrpo_jax.distributed import shard_model

    g, s = nnx.split(model)
    return shard_model(nnx.merge(g, jax.tree.map(lambda a: a, s)), mesh)


def _first_fresh_step(tokens, lo=2):
    """A step j >= lo whose token (and the pair ending at it) appears nowhere earlier in the row."""
    for j in range(lo, len(tokens)):
        if tokens[j] not in tokens[:j] and tokens[j - 1] != tokens[j]:
            return j
    pytest.fail("seeded rollout has no fresh token to use as a stop/think-end id: choose another seed")


def test_think_end_switches_to_discrete(model):
    key = jax.random.key(3)
    free = _engine(model, mode="gumbel", max_new_tokens=12).generate(PROMPTS[:1], key)
    toks = [int(t) for t in np.asarray(free.tokens[0])]
    j = _first_fresh_step(toks)
    end = (toks[j - 1], toks[j])
    r = _engine(model, mode="gumbel", max_new_tokens=12, think_end_ids=end).generate(PROMPTS[:1], key)
    soft = np.asarray(r.soft_mask[0])
    assert soft[:j].all() and not soft[j:].any(), soft
    np.testing.assert_array_equal(np.asarray(r.tokens[0, :j + 1]), toks[:j + 1])
    np.testing.assert_array_equal(np.asarray(r.topk_ids[0, j]), [toks[j]] + [0] * 4)
    np.testing.assert_array_equal(np.asarray(r.weights[0, j]), [1, 0, 0, 0, 0])
    # the think-end step and the discrete steps after it keep slot 0 only and record no clamped slot
    assert (np.asarray(r.topk_kept[0, j:]) == [1, 0, 0, 0, 0]).all() and not np.asarray(r.topk_clamped[0, j:]).any()
    assert int(r.think_lengths[0]) == j + 1
    # after thinking, discrete steps store one-hot ids and zero ytil
    assert (np.asarray(r.topk_ids[0, j + 1:, 1:]) == 0).all() and (np.asarray(r.topk_ytil[0, j:]) == 0).all()
    # the original's last-sub-token test ends at the first occurrence of the last sub-token
    last = _engine(model, mode="gumbel", max_new_tokens=12, think_end_ids=(12345, toks[j]),
                   think_end_match="last_subtoken").generate(PROMPTS[:1], key)
    assert int(last.think_lengths[0]) == j + 1
    full = _engine(model, mode="gumbel", max_new_tokens=12, think_end_ids=(12345, toks[j])).generate(
        PROMPTS[:1], key)
    assert np.asarray(full.soft_mask[0]).all()  # "12345" never emitted: the full string never matches


def test_eos_and_max_length(model):
    key = jax.random.key(4)
    free = _engine(model, mode="discrete", max_new_tokens=10).generate(PROMPTS, key)
    toks = np.asarray(free.tokens)
    j = _first_fresh_step(list(toks[0]), lo=3)
    r = _engine(model, mode="discrete", max_new_tokens=10, stop_ids=(int(toks[0, j]),)).generate(PROMPTS, key)
    assert int(r.lengths[0]) == j + 1 and int(r.finish_reason[0]) == 1
    m = np.asarray(r.response_mask[0])
    assert m[:j + 1].all() and not m[j + 1:].any()
    assert (np.asarray(r.tokens[0, j + 1:]) == 0).all()
    others = [b for b in range(4) if int(toks[0, j]) not in toks[b]]
    for b in others:
        assert int(r.lengths[b]) == 10 and int(r.finish_reason[b]) == 0
    np.testing.assert_array_equal(np.asarray(free.lengths), 10)


def test_cold_stop(model):
    key = jax.random.key(6)
    end = (7, 9)
    r = _engine(model, mode="gumbel", max_new_tokens=12, think_end_ids=end, early_stopping_entropy_threshold=1e9,
                early_stopping_length_threshold=3).generate(PROMPTS[:2], key)
    for b in range(2):
        soft = np.asarray(r.soft_mask[b])
        toks = np.asarray(r.tokens[b])
        # steps 0,1 soft; step 2 triggers: the think-end string is emitted as one-hot steps 2,3
        assert soft[:2].all() and not soft[2:].any(), soft
        np.testing.assert_array_equal(toks[2:4], end)
        assert int(r.think_lengths[b]) == 4
        # in the discrete phase the same condition aborts the row after 3 more steps
        assert int(r.finish_reason[b]) == 2 and int(r.lengths[b]) == 7
    off = _engine(model, mode="gumbel", max_new_tokens=12, think_end_ids=end).generate(PROMPTS[:2], key)
    assert np.asarray(off.soft_mask).sum() > 8  # cold stop off by default


def test_same_seed_same_rollout(model):
    eng = _engine(model, mode="gumbel", max_new_tokens=6)
    a = eng.generate(PROMPTS, jax.random.key(2), n=2)
    b = eng.generate(PROMPTS, jax.random.key(2), n=2)
    c = eng.generate(PROMPTS, jax.random.key(3), n=2)
    np.testing.assert_array_equal(np.asarray(a.topk_ytil), np.asarray(b.topk_ytil))
    assert not np.array_equal(np.asarray(a.topk_ytil), np.asarray(c.topk_ytil))
    # group rows get independent noise
    assert not np.array_equal(np.asarray(a.topk_ytil[0]), np.asarray(a.topk_ytil[1]))
    np.testing.assert_array_equal(np.asarray(a.prompt_tokens[0]), np.asarray(a.prompt_tokens[1]))


def test_per_row_budgets_and_work_counters(tmp_path):
    """generate(max_new_tokens=[...]): each row stops at its own budget (finish reason "length") with the tokens it
    has with the full budget (noise keyed by row and step); Rollout.stats counts the decode's work as a NumPy
    recount of the rows' lengths and prompts says."""
    from helpers import make_hf_model
    from softgrpo_jax import load_pretrained
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

    make_hf_model(str(tmp_path), "qwen2", seed=3, vocab_size=64)
    model = load_pretrained(str(tmp_path))
    eng = RolloutEngine(model, SamplingConfig(mode="gumbel", max_new_tokens=10, top_k=5, top_p=0.9), pad_id=0,
                        schedule="static")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    full = eng.generate(prompts, jax.random.key(7), n=2, modes=["gumbel", "discrete"] * 3)
    budgets = [10, 3, 7, 1, 10, 5]
    cut = eng.generate(prompts, jax.random.key(7), n=2, modes=["gumbel", "discrete"] * 3, max_new_tokens=budgets)
    ft, ct = np.asarray(full.tokens), np.asarray(cut.tokens)
    fl, cl = np.asarray(full.lengths), np.asarray(cut.lengths)
    for b, n in enumerate(budgets):
        assert cl[b] == min(n, fl[b])
        np.testing.assert_array_equal(ct[b, :cl[b]], ft[b, :cl[b]])
        np.testing.assert_array_equal(np.asarray(cut.topk_ytil)[b, :cl[b]], np.asarray(full.topk_ytil)[b, :cl[b]])
        if fl[b] > n:
            assert int(np.asarray(cut.finish_reason)[b]) == 0
    for r in (full, cut):
        s = r.stats
        lens = np.asarray(r.lengths).astype(np.int64)
        plen = np.asarray(r.prompt_mask).sum(1).astype(np.int64)
        assert s.row_steps_useful == lens.sum() and s.row_steps_computed == s.steps * len(lens)
        assert s.steps == lens.max()
        assert s.kv_slots_valid == sum(sum(p + j + 1 for j in range(n)) for p, n in zip(plen, lens))
        assert s.kv_slots_read == s.steps * len(lens) * (r.prompt_tokens.shape[1] + int(max(budgets if r is cut
                                                                                              else [10])))
    with pytest.raises(ValueError, match="one per row"):
        eng.generate(prompts, jax.random.key(7), n=2, max_new_tokens=[3, 4])


@pytest.mark.parametrize("arch,attention", [("qwen2", "xla"), ("llama", "pallas"), ("qwen2", "pallas_tpu")])
def test_chunked_schedule_equals_static(tmp_path, arch, attention):
    """The chunked schedule (short chunks, so the cache grows and finished rows leave the batch several times, with
    padding slots) gives the static schedule's rollout exactly: every stored quantity of every row. Its work
    counters equal a NumPy recount of the schedule from the rows' lengths, and it computes fewer row-steps and
    reads fewer KV slots than the static one."""
    from helpers import make_hf_model
    from softgrpo_jax import load_pretrained
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig
    from softgrpo_jax.sampling.engine import batch_bucket, cache_bucket

    make_hf_model(str(tmp_path), arch, seed=5, vocab_size=64)
    model = load_pretrained(str(tmp_path))
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=24, top_k=5, top_p=0.9)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [12, 13, 14, 15]]
    budgets = [24, 3, 7, 1, 20, 5, 2, 11, 24, 9, 4, 16]
    modes = ["gumbel", "discrete", "soft"] * 4
    out = {}
    for sched in ("static", "chunked"):
        eng = RolloutEngine(model, cfg, think_end_ids=[7], stop_ids=[2], pad_id=0, schedule=sched, chunk_steps=3,
                            attention=attention)
        out[sched] = eng.generate(prompts, jax.random.key(11), n=3, modes=modes, max_new_tokens=budgets)
    st, ch = out["static"], out["chunked"]
    for f in ("tokens", "response_mask", "topk_ids", "soft_mask", "topk_kept", "topk_clamped", "lengths",
              "think_lengths", "finish_reason"):
        np.testing.assert_array_equal(np.asarray(getattr(ch, f)), np.asarray(getattr(st, f)), err_msg=f)
    for f in ("topk_ytil", "weights", "logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(ch, f)), np.asarray(getattr(st, f)), rtol=1e-5, atol=1e-5,
                                   err_msg=f)
    lens = np.asarray(ch.lengths)
    assert len(set(lens.tolist())) > 3  # rows end at many different steps
    # NumPy recount: a chunk starting at step i runs the rows still live (length > i) in their batch bucket
    Pn, total, C = ch.prompt_tokens.shape[1], max(budgets), 3
    i, computed, read = 0, 0, 0
    gran = 256 if attention != "xla" else 16
    while i < lens.max():
        live = lens > i
        b = batch_bucket(int(live.sum()))
        ran = min(C, int(lens[live].max()) - i)
        computed += b * ran
        if attention == "xla":
            read += b * ran * cache_bucket(Pn + min(i + C, total), gran)
        i += ran
    s = ch.stats
    assert (s.steps, s.row_steps_computed, s.row_steps_useful) == (lens.max(), computed, lens.sum())
    assert s.kv_slots_valid == st.stats.kv_slots_valid
    if attention == "xla":
        assert s.kv_slots_read == read
    assert s.row_steps_computed < st.stats.row_steps_computed and s.kv_slots_read < st.stats.kv_slots_read
    with pytest.raises(ValueError, match="schedule"):
        RolloutEngine(model, cfg, schedule="dynamic")


def test_buckets():
    """Cache lengths step by at most 1.125x (multiples of the granule); batch buckets by at most 1.25x (multiples
    of the mesh's batch devices)."""
    from softgrpo_jax.sampling.engine import batch_bucket, cache_bucket

    for g in (16, 256):
        prev = 0
        for n in range(1, 20000, 7):
            c = cache_bucket(n, g)
            assert c >= n and c % g == 0 and c >= prev
            assert c <= max(g, 1.125 * n + g), (n, g, c)
            prev = c
    for d in (1, 2, 8):
        for n in range(1, 600):
            b = batch_bucket(n, d)
            assert b >= n and b % d == 0 and b <= max(d, 1.25 * n + d), (n, d, b)
    assert [batch_bucket(n) for n in (1, 3, 5, 9, 11, 17, 33, 65)] == [1, 3, 5, 10, 12, 20, 40, 80]
    assert len({cache_bucket(n, 256) for n in range(1024, 9217)}) <= 24


@pytest.mark.parametrize("attention,layout", [("pallas", "auto"), ("pallas_tpu", "scan"), ("pallas_tpu", "per_layer")])
def test_pallas_decode_attention_engine_equals_xla(tmp_path, attention, layout):
    """RolloutEngine(attention="pallas": GPU's kernel here; "pallas_tpu": TPU's, on the stacked and per-layer
    caches; interpret mode) samples the XLA engine's tokens and stored quantities, and reads only each row's own
    context (its work counter)."""
    from helpers import make_hf_model
    from softgrpo_jax import load_pretrained
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

    make_hf_model(str(tmp_path), "llama", seed=4, vocab_size=64)
    model = load_pretrained(str(tmp_path))
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=8, top_k=5, top_p=0.9)
    out = {}
    for impl in ("xla", attention):
        eng = RolloutEngine(model, cfg, pad_id=0, attention=impl, layout=layout)
        assert eng.attention == {"pallas": "pallas_gpu"}.get(impl, impl)  # off TPU "pallas" is GPU's kernel
        out[impl] = eng.generate([[1, 2, 3, 4, 5, 6], [7, 8]], jax.random.key(2), n=2)
    x, p = out["xla"], out[attention]
    np.testing.assert_array_equal(np.asarray(p.tokens), np.asarray(x.tokens))
    np.testing.assert_allclose(np.asarray(p.topk_ytil), np.asarray(x.topk_ytil), rtol=1e-4, atol=1e-4)
    assert p.stats.kv_slots_read < x.stats.kv_slots_read
    assert p.stats.kv_slots_read >= p.stats.kv_slots_valid == x.stats.kv_slots_valid
    with pytest.raises(ValueError, match="rollout attention"):
        RolloutEngine(model, cfg, attention="flash")


def compiled_decode(eng, ms, mesh, cfg, cache_len=None) -> str:
    """The compiled HLO text of ``eng``'s decode loop (6 steps, every row Gumbel) for PROMPTS x 2 on ``mesh``,
    after a prefill into ``cache_len`` slots (None: the prompts and the 6 steps)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from softgrpo_jax.distributed import BATCH_AXES, fit_spec
    from softgrpo_jax.sampling.engine import decode, prefill

    mcfg, params = eng.decode_params(ms)
    toks, mask = eng.prepare_prompts(PROMPTS * 2)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, fit_spec(a.shape, P(BATCH_AXES), mesh)))  # noqa: E731
    toks, mask = put(toks), put(mask)
    modes = put(np.full(toks.shape[0], 2, np.int32))
    keys = jax.random.split(jax.random.key(0), toks.shape[0])
    logits0, cache = prefill(mcfg, params, toks, mask, cache_len=cache_len or toks.shape[1] + 6, mesh=mesh)
    return decode.lower(mcfg, params, logits0, cache, modes, keys, cfg=cfg, end_ids=(), stop_ids=(), pad_id=0,
                        steps=6, embed_impl="auto", mesh=mesh, attention=eng.attention).compile().as_text()


def test_no_collectives_in_the_decode_loop(model):
    """On data-parallel and FSDP meshes of the 8 CPU devices the compiled decode loop's body holds no collective
    (the weights are laid out for decoding once per rollout, sampling runs per batch shard; the done flag's
    reduction sits in the loop's condition). A tensor-parallel mesh needs them in the body, and the reader finds
    them there."""
    from softgrpo_jax.hlo import collectives_in_loops

    assert jax.device_count() == 8
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=6)
    found = {}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = make_mesh(shape)
        ms = load_pretrained_like(model, mesh)
        eng = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh, layout="scan")
        found[shape] = collectives_in_loops(compiled_decode(eng, ms, mesh, cfg, cache_len=None))
    assert found[(8, 1, 1)] == [] and found[(2, 4, 1)] == [], found
    assert {op for op, _ in found[(2, 2, 2)]} >= {"all-reduce"}


@pytest.mark.parametrize("attention,layout", [("pallas_gpu", "per_layer"), ("pallas_tpu", "scan")])
def test_no_collectives_in_the_decode_loop_with_pallas_attention(model, attention, layout):
    """A Pallas call has no SPMD partitioning rule: under the sharded decode loop XLA would gather its operands,
    the whole KV cache, onto every device at every step. The decode attention runs on each device's own rows
    (shard_map): on data-parallel and FSDP meshes the loop body holds no collective, and the rollout is the
    unsharded one (also on a tensor-parallel mesh, each device its own KV heads)."""
    from softgrpo_jax.hlo import collectives_in_loops

    cfg = SamplingConfig(mode="gumbel", max_new_tokens=6)
    ref = RolloutEngine(model, cfg, pad_id=0, attention=attention, layout=layout).generate(
        PROMPTS * 2, jax.random.key(3))
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = make_mesh(shape)
        ms = load_pretrained_like(model, mesh)
        eng = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh, layout=layout, attention=attention)
        r = eng.generate(PROMPTS * 2, jax.random.key(3))
        np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(ref.tokens))
        np.testing.assert_allclose(np.asarray(r.topk_ytil), np.asarray(ref.topk_ytil), atol=1e-5)
        if shape[2] > 1:  # tensor parallelism reduces over the heads inside the loop by design
            continue
        found = collectives_in_loops(compiled_decode(eng, ms, mesh, cfg, cache_len=256))
        assert found == [], (shape, found[:3])


def _decode_loop_dots(eng, model):
    """The dot instructions one compiled decode step (the loop body) runs, single device, 6 Gumbel steps."""
    from softgrpo_jax.hlo import ops_in_loops
    from softgrpo_jax.sampling.engine import decode, prefill

    cfg = eng.cfg
    mcfg, params = eng.decode_params(model)
    toks, mask = eng.prepare_prompts(PROMPTS * 2)
    modes = jnp.full(toks.shape[0], 2, jnp.int32)
    keys = jax.random.split(jax.random.key(0), toks.shape[0])
    logits0, cache = prefill(mcfg, params, jnp.asarray(toks), jnp.asarray(mask), cache_len=toks.shape[1] + 6)
    hlo = decode.lower(mcfg, params, logits0, cache, modes, keys, cfg=cfg, end_ids=(), stop_ids=(), pad_id=0,
                       steps=6, embed_impl="auto", mesh=None, attention=eng.attention).compile().as_text()
    return len(ops_in_loops(hlo, ("dot",)))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_projections_same_rollouts_fewer_gemms(tmp_path, family):
    """The decode copy of the weights with q / k / v fused into one GEMM and gate / up into another: the same
    rollouts as the separate weights (float32 per-layer: every token and mixture weight; bf16 under the layer
    scan: every token), and the compiled decode step runs 3 fewer dots per layer (7 weight GEMMs -> 4; read from
    its HLO). Qwen2 has
    q / k / v biases (fused too), Llama none. On a tensor-parallel mesh the engine keeps the weights separate."""
    make_hf_model(str(tmp_path), family, seed=6)
    model = load_pretrained(str(tmp_path))
    L = model.config.num_layers
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=8, top_k=5, top_p=0.9)
    # (Llama, without biases: the per-layer rollouts only)
    for layout, dtype in (("per_layer", None), ("scan", "bfloat16"))[:2 if family == "qwen2" else 1]:
        out, dots = {}, {}
        for fuse in (False, True):
            eng = RolloutEngine(model, cfg, pad_id=0, layout=layout, dtype=dtype, fuse_projections=fuse)
            layers = eng.decode_params(model)[1]["layers"]
            keys = set(layers[0] if isinstance(layers, list) else layers)
            assert ("wqkv" in keys and "w_gate_up" in keys and "wq" not in keys and "w_up" not in keys) == fuse
            assert ("bqkv" in keys) == (fuse and family == "qwen2")
            out[fuse] = eng.generate(PROMPTS, jax.random.key(4), n=2)
            if family == "qwen2":
                dots[fuse] = _decode_loop_dots(eng, model)
        a, b = out[False], out[True]
        np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
        np.testing.assert_array_equal(np.asarray(b.lengths), np.asarray(a.lengths))
        if dtype is None:
            np.testing.assert_allclose(np.asarray(b.topk_ytil), np.asarray(a.topk_ytil), rtol=1e-5, atol=1e-5)
        # per-layer: every layer's dots in the step's program; scan: one layer body, run L times
        if dots:
            assert dots[False] - dots[True] == 3 * (L if layout == "per_layer" else 1), (layout, dots)
    eng = RolloutEngine(model, cfg, pad_id=0, mesh=make_mesh((2, 2, 2)), fuse_projections=True)
    assert not eng.fuse


def test_fused_projections_gather_fewer_weights_per_step(model):
    """A model decoding with its FSDP shards (too large to replicate: ``decode_layout`` keeps them) under the layer
    scan all-gathers each layer's weights inside the decode loop, every step: with fused projections 4 weight
    matrices per layer instead of 7 (read from the compiled loop body on an 8-device FSDP mesh)."""
    from collections import Counter

    from jax.sharding import NamedSharding, PartitionSpec as P

    from softgrpo_jax.distributed import BATCH_AXES, fit_spec
    from softgrpo_jax.hlo import collectives_in_loops
    from softgrpo_jax.sampling import engine as E

    mesh = make_mesh((1, 8, 1))
    ms = load_pretrained_like(model, mesh)
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=6)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, fit_spec(a.shape, P(BATCH_AXES), mesh)))  # noqa: E731
    gathers = {}
    for fuse in (False, True):
        eng = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh, layout="scan", dtype="bfloat16", fuse_projections=fuse)
        assert eng.fuse == fuse
        mcfg = ms.config.replace(dtype="bfloat16", param_dtype="bfloat16")
        params = E._prepare(ms.param_tree(), dtype=jnp.bfloat16, per_layer=False, fuse=fuse)
        params = E.decode_layout(params, mesh, budget_bytes=1)  # no room for a replicated copy
        toks, mask = (put(a) for a in eng.prepare_prompts(PROMPTS * 2))
        modes = put(np.full(toks.shape[0], 2, np.int32))
        keys = jax.random.split(jax.random.key(0), toks.shape[0])
        logits0, cache = E.prefill(mcfg, params, toks, mask, cache_len=toks.shape[1] + 6, mesh=mesh)
        hlo = E.decode.lower(mcfg, params, logits0, cache, modes, keys, cfg=cfg, end_ids=(), stop_ids=(), pad_id=0,
                             steps=6, embed_impl="auto", mesh=mesh, attention=eng.attention).compile().as_text()
        gathers[fuse] = Counter(op for op, _ in collectives_in_loops(hlo))["all-gather"]
    assert gathers[False] - gathers[True] == 3, gathers  # one layer body: 7 sharded weights -> 4


def test_fsdp_kept_decode_weights_take_the_layer_scan(model, monkeypatch):
    """Where a replicated decode copy would not fit (simulated: the engine's memory rule says no), layout "auto"
    decodes from the FSDP shards under the layer scan: per-layer weights' gathers do not depend on the step and
    XLA may hoist them out of the loop (XLA:CPU does), every layer's gathered weights at once (test_plan). The
    rollouts equal one device's; an explicit "per_layer" stays per-layer."""
    from softgrpo_jax.sampling import engine as E

    mesh = make_mesh((1, 8, 1))
    ms = load_pretrained_like(model, mesh)
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=6)
    ref = RolloutEngine(model, cfg, pad_id=0).generate(PROMPTS * 2, jax.random.key(3))
    assert RolloutEngine(ms, cfg, pad_id=0, mesh=mesh).decode_params(ms)[1]["layers"].__class__ is list
    monkeypatch.setattr(E, "replicate_decode_weights", lambda *a, **k: False)
    eng = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh)
    layers = eng.decode_params(ms)[1]["layers"]
    assert isinstance(layers, dict) and "fsdp" in str(layers["w_down"].sharding.spec)
    r = eng.generate(PROMPTS * 2, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(r.topk_ytil), np.asarray(ref.topk_ytil), rtol=1e-5, atol=1e-5)
    explicit = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh, layout="per_layer")
    assert isinstance(explicit.decode_params(ms)[1]["layers"], list)


def test_rollout_waves_rule():
    """rollout_waves: one wave where the weights are not FSDP-split or their replicated copy fits beside every
    row's cache (60% of the memory), else the fewest waves (up to 4) whose rows' cache leaves it room, else one
    (decoding from the shards)."""
    from softgrpo_jax.sampling.layout import rollout_waves

    mesh = make_mesh((1, 8, 1))
    gib = 1 << 30
    # weights 10 GiB, 8 rows per device of 1 GiB cache each, 5 GiB already in use; 60% of the budget for all of it
    w = lambda budget, **kw: rollout_waves(10 * gib, 8, gib, mesh, int(budget / 0.6) + 64, 5 * gib, **kw)  # noqa: E731
    assert w(23 * gib) == 1  # 10 + 8 + 5 fits
    assert w(19 * gib) == 2 and w(17 * gib) == 4 and w(16.9 * gib) == 1  # 4 rows; 2 rows; not even 2: the shards
    assert w(19 * gib, sharded=False) == 1 and rollout_waves(10 * gib, 8, gib, mesh, None) == 1  # unknown memory
    assert rollout_waves(10 * gib, 8, gib, make_mesh((1, 4, 2)), int(12 / 0.6 * gib), 0) == 2  # tensor halves w


def test_waves_give_the_same_rollouts(model, monkeypatch):
    """A rollout decoded in waves of prompts (max_rows_per_device, or the automatic rule where the replicated
    decode weights would not fit beside every row's cache: simulated here with a device memory the rule sees) is
    the one-call rollout: the same tokens, top-K ids and noise, lengths and finish reasons for every row, laid out
    as one call lays them out (prompts left-padded to the widest bucket, steps to the longest budget), and the
    work counters summed. The waves' prompts differ in length and their budgets in range, so every padding shows."""
    from softgrpo_jax.sampling import engine as E

    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [4, 5]] * 4 + [[11], [12, 13, 14]] * 4
    budgets = [6, 1, 2, 5] * 4 + [2, 3, 1, 2] * 4
    modes = ["gumbel", "discrete", "soft", "gumbel"] * 8
    key = jax.random.key(7)
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=6)
    mesh = make_mesh((1, 8, 1))
    ms = load_pretrained_like(model, mesh)
    ref = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh).generate(prompts, key, n=2, modes=modes,
                                                                max_new_tokens=budgets)
    two = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh, max_rows_per_device=2)
    assert two.waves(ms, 32, 64) == 2
    # automatic: a device whose 60% holds the replicated weights and half the rows' cache, not all of it
    eng = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh)
    w = E.weight_bytes(ms.param_tree(), ms.config.dtype)
    row = eng._kv_bytes_per_row(ms, eng._cache_len(32, 6))
    from softgrpo_jax.sampling import layout

    for mod in (E, layout):  # the engine's waves and the layout's replication decision read the same memory
        monkeypatch.setattr(mod, "device_memory", lambda mesh: (int((w + 3 * row) / 0.6), 0))
    assert eng.waves(ms, 32, eng._cache_len(32, 6)) == 2
    for r in (two.generate(prompts, key, n=2, modes=modes, max_new_tokens=budgets),
              eng.generate(prompts, key, n=2, modes=modes, max_new_tokens=budgets)):
        for f in ("prompt_tokens", "prompt_mask", "tokens", "response_mask", "topk_ids", "topk_kept", "topk_clamped",
                  "soft_mask", "lengths", "think_lengths", "finish_reason", "modes", "tau"):
            a, b = getattr(r, f), getattr(ref, f)
            assert a.shape == b.shape, f
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f)
        for f in ("topk_ytil", "weights", "logprobs"):
            np.testing.assert_allclose(np.asarray(getattr(r, f)), np.asarray(getattr(ref, f)), atol=1e-5, err_msg=f)
        assert r.stats.row_steps_useful == ref.stats.row_steps_useful
        assert r.stats.kv_slots_valid == ref.stats.kv_slots_valid
        assert r.stats.steps > ref.stats.steps  # two waves' decodes, one after the other
    with pytest.raises(ValueError, match="max_rows_per_device"):
        RolloutEngine(ms, cfg, max_rows_per_device=-1)


def test_chunked_schedule_on_meshes(model):
    """On 8-device meshes the chunked schedule (short chunks, rows ending at many steps: each device regroups its
    own live rows) gives the unsharded static schedule's rollout; the regrouping keeps rows on their device (no
    all-gather in its program on a data-parallel mesh)."""
    from softgrpo_jax.hlo import computations
    from softgrpo_jax.sampling import engine as E

    prompts = PROMPTS * 4
    budgets = [6, 1, 2, 5, 3, 6, 4, 2] * 4
    modes = ["gumbel", "discrete", "soft", "gumbel"] * 8
    key = jax.random.key(5)
    cfg = SamplingConfig(mode="gumbel", max_new_tokens=6)
    ref = RolloutEngine(model, cfg, pad_id=0, schedule="static").generate(prompts, key, n=2, modes=modes,
                                                                          max_new_tokens=budgets)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        mesh = make_mesh(shape)
        ms = load_pretrained_like(model, mesh)
        eng = RolloutEngine(ms, cfg, pad_id=0, mesh=mesh, chunk_steps=2)
        r = eng.generate(prompts, key, n=2, modes=modes, max_new_tokens=budgets)
        for f in ("tokens", "lengths", "finish_reason", "topk_ids", "response_mask"):
            np.testing.assert_array_equal(np.asarray(getattr(r, f)), np.asarray(getattr(ref, f)), err_msg=f)
        np.testing.assert_allclose(np.asarray(r.topk_ytil), np.asarray(ref.topk_ytil), atol=1e-5)
        assert r.stats.row_steps_computed < ref.stats.row_steps_computed
    # the regrouping program of a data-parallel mesh: local takes only
    mesh = make_mesh((8, 1, 1))
    cache = {"k": jnp.zeros((2, 16, 2, 8, 4)), "v": jnp.zeros((2, 16, 2, 8, 4)), "mask": jnp.zeros((16, 8), bool),
             "pos": jnp.zeros((16,), jnp.int32), "index": jnp.int32(3)}
    put = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    P_ = jax.sharding.PartitionSpec
    cache = {k: put(v, P_(None, "data") if k in ("k", "v") else P_("data") if v.ndim else P_())
             for k, v in cache.items()}
    idx = put(jnp.zeros((8,), jnp.int32), P_("data"))
    hlo = E._reshape_batch.lower(cache, put(jnp.zeros((16, 64)), P_("data")), idx, new_len=8,
                                 mesh=mesh).compile().as_text()
    assert computations(hlo) and "all-gather" not in hlo and "all-to-all" not in hlo
