"""Multi-host: 2 processes x 4 CPU devices (JAX distributed runtime, gloo collectives) give the same rollout, rewards,
log-probs, update and checkpoint as 1 process x 8 devices.

Each run is this file started as a script (``python tests/test_multihost.py worker ...``) in fresh interpreters, so
each process sets its own device count before JAX starts. The workers exercise the code paths a multi-host
``softgrpo train`` takes: ``distributed.initialize``, ``host_to_global`` batches (each process transfers its rows),
the sharded rollout, ``local_rows`` reward scoring + ``allgather_rows``, ``to_host`` gathers in
``rollout_to_batch``, a jitted donated update, and an orbax save + restore that every process takes part in.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MESH = (2, 2, 2)  # data spans the two processes; fsdp and tensor stay inside each
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
GROUP = 4


# ------------------------------------------------------------------------------------------------------ worker
def worker(a):
    from helpers import xla_flags

    os.environ["XLA_FLAGS"] = xla_flags(a.devices)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from softgrpo_jax import distributed as dist

    if a.nproc > 1:
        info = dist.initialize(f"127.0.0.1:{a.port}", a.nproc, a.pid, cpu_collectives="gloo",
                               initialization_timeout=60)
        assert info["initialized"] and info["num_processes"] == a.nproc, info
    import jax.numpy as jnp

    from softgrpo_jax import load_pretrained
    from softgrpo_jax.config import base_config, loss_config
    from softgrpo_jax.rl.objective import group_advantages
    from softgrpo_jax.rl.trainer import Checkpointer, PolicyState, make_optimizer, rollout_to_batch, split_micro
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig

    assert jax.device_count() == 8 and jax.local_device_count() == a.devices
    # a data set in a folder every process shares: process 0 prepares it, the others wait and read its copy
    from softgrpo_jax import data as data_lib

    data_dir, built = os.path.join(a.out, "data"), []
    real_prepare = data_lib.prepare

    def prepare(name, **kw):
        from softgrpo_jax.data import builders

        b = builders.get_builder(name, data_dir=kw.get("data_dir"), **{
            k: v for k, v in kw.items() if k not in ("data_dir", "manual_dir", "rebuild")})
        built.append(not os.path.exists(os.path.join(str(b.data_dir), "dataset_info.json")))
        return real_prepare(name, **kw)

    data_lib.prepare = prepare
    from softgrpo_jax.train import _output_lock

    with _output_lock(a.out, "trainer.output_dir"):  # taken by process 0, its outcome told to every process
        questions = [e["question"] for e in data_lib.load_split("reasoning_gym_math", "test", data_dir=data_dir,
                                                                 tasks=("gcd",), train_size=8, test_size=4, seed=3)]
        locked = os.path.exists(os.path.join(a.out, ".softgrpo.lock"))
    mesh = dist.make_mesh(MESH)
    model = load_pretrained(a.model, mesh=mesh)
    pol = PolicyState(model, make_optimizer(3e-2), loss_config(base_config().rl, noise="gumbel"), mesh)
    eng = RolloutEngine(model, SamplingConfig(mode="gumbel", max_new_tokens=8, top_k=5, tau=0.5), pad_id=0,
                        mesh=mesh)
    modes = ["gumbel", "gumbel", "discrete", "gumbel"] * GROUP
    r = eng.generate(PROMPTS, jax.random.key(7), n=GROUP, modes=modes, model=pol.model)

    # rewards: this process scores only its rows, then every process gets all of them
    toks, lens = dist.to_host(r.tokens), dist.to_host(r.lengths)
    rows = dist.local_rows(r.tokens)
    local = np.asarray([((toks[b, :lens[b]] % 2) == 0).mean() if lens[b] else 0.0 for b in rows], np.float32)
    rew = dist.allgather_rows(local, rows, toks.shape[0])
    batch = rollout_to_batch(r, np.asarray(group_advantages(jnp.asarray(rew), GROUP)))
    mb = pol.put(split_micro(batch, 2))
    old = pol.logprobs(pol.params, mb)
    ref = pol.logprobs(pol.ref_params, mb)
    metrics = jax.device_get(pol.update(mb, old, ref))

    # orbax: every process saves its shards; restore into a fresh state and compare
    ck = Checkpointer(os.path.join(a.out, "ckpt"))
    ck.save(1, pol.params, pol.opt_state, {"step": 1})
    fresh = PolicyState(load_pretrained(a.model, mesh=mesh), make_optimizer(3e-2),
                        loss_config(base_config().rl, noise="gumbel"), mesh)
    params2, _, meta = ck.restore(1, fresh.params, fresh.opt_state)
    ck.close()
    p1 = jax.tree.leaves(jax.tree.map(dist.to_host, pol.params))
    p2 = jax.tree.leaves(jax.tree.map(dist.to_host, params2))
    restored_equal = all(np.array_equal(x, y) for x, y in zip(p1, p2)) and meta["step"] == 1

    out = dict(tokens=toks, lengths=lens, ytil=dist.to_host(r.topk_ytil), ids=dist.to_host(r.topk_ids),
               rewards=rew, old_lp=dist.to_host(old), ref_lp=dist.to_host(ref), rows=rows,
               params=np.concatenate([np.ravel(x).astype(np.float64) for x in p1]))
    out.update({f"m_{k}": np.asarray(v) for k, v in metrics.items()})
    np.savez(os.path.join(a.out, f"proc{a.pid}.npz"), **out)
    with open(os.path.join(a.out, f"proc{a.pid}.json"), "w") as f:
        json.dump(dict(restored_equal=bool(restored_equal), questions=questions, built=built, locked=locked,
                       process_index=jax.process_index(),
                       process_count=jax.process_count(), main=dist.is_main_process()), f)
    dist.sync("done")


# ------------------------------------------------------------------------------------------------------ test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir, out, nproc, devices, timeout=110):
    os.makedirs(out, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, __file__, "worker", "--model", model_dir, "--out", out,
                               "--nproc", str(nproc), "--pid", str(i), "--port", str(port), "--devices",
                               str(devices)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(nproc)]
    deadline = time.time() + timeout
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1, deadline - time.time()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs + [""] * (nproc - len(logs)))):
        assert p.returncode == 0, f"process {i} of {nproc} failed (rc {p.returncode}):\n{log[-4000:]}"
    return [dict(np.load(os.path.join(out, f"proc{i}.npz"))) for i in range(nproc)], \
        [json.load(open(os.path.join(out, f"proc{i}.json"))) for i in range(nproc)]


def test_two_processes_match_one(tmp_path):
    from helpers import make_hf_model

    mdir = str(tmp_path / "model")
    make_hf_model(mdir, "qwen2", seed=5, vocab_size=64)
    (one,), (info1,) = _launch(mdir, str(tmp_path / "one"), 1, 8)
    two, info2 = _launch(mdir, str(tmp_path / "two"), 2, 4)

    assert [i["process_index"] for i in info2] == [0, 1] and all(i["process_count"] == 2 for i in info2)
    assert [i["main"] for i in info2] == [True, False]
    # the shared data folder: built once, by process 0, before process 1 read it; the same problems everywhere
    assert [i["built"] for i in info2] == [[True], [False]] and info1["built"] == [True]
    assert all(i["locked"] for i in info2)
    assert info2[0]["questions"] == info2[1]["questions"] == info1["questions"] and len(info1["questions"]) == 4
    assert info1["restored_equal"] and all(i["restored_equal"] for i in info2)
    # each process scored a disjoint half of the batch
    r0, r1 = two[0]["rows"], two[1]["rows"]
    assert len(r0) == len(r1) == 8 and not set(r0) & set(r1) and sorted([*r0, *r1]) == list(range(16))
    assert list(one["rows"]) == list(range(16))
    for got in two:  # both processes hold the same global values, equal to the one-process run
        np.testing.assert_array_equal(got["tokens"], one["tokens"])
        np.testing.assert_array_equal(got["ids"], one["ids"])
        np.testing.assert_array_equal(got["lengths"], one["lengths"])
        np.testing.assert_allclose(got["ytil"], one["ytil"], atol=1e-5)
        np.testing.assert_allclose(got["rewards"], one["rewards"], atol=1e-6)
        np.testing.assert_allclose(got["old_lp"], one["old_lp"], atol=1e-5)
        np.testing.assert_allclose(got["ref_lp"], one["ref_lp"], atol=1e-5)
        for k in one:
            if k.startswith("m_"):
                np.testing.assert_allclose(got[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)
        # one AdamW step of lr 3e-2: Adam's normalised update turns the gradients' float reduction-order differences
        # (rtol ~1e-4 above) into a few 1e-6; 1e-5 is still 3e-4 of the step
        np.testing.assert_allclose(got["params"], one["params"], atol=1e-5)
    assert float(one["m_grad_norm"]) > 0 and (one["lengths"] > 0).all()


def test_initialize_settings(monkeypatch):
    from softgrpo_jax import distributed as dist

    assert dist.detect_cluster({}) is None
    assert dist.detect_cluster({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "4"}) == "slurm"
    assert dist.detect_cluster({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "1"}) is None
    assert dist.detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
    assert dist.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "cloud_tpu"
    assert dist.detect_cluster({"SOFTGRPO_COORDINATOR": "h:1"}) == "explicit"
    # nothing detected: a single process, nothing initialised
    assert dist.initialize(environ={})["how"] == "single"
    assert dist.initialize(environ={"SOFTGRPO_DISTRIBUTED": "off", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})[
        "how"] == "off"
    import pytest

    with pytest.raises(dist.DistributedError, match="process count"):
        dist.initialize(environ={"SOFTGRPO_COORDINATOR": "10.0.0.1:1234"})
    with pytest.raises(dist.DistributedError, match="need a coordinator"):
        dist.initialize(num_processes=2, process_id=0, environ={})
    with pytest.raises(dist.DistributedError, match="host:port"):
        dist.initialize("10.0.0.1", 2, 0, environ={})
    with pytest.raises(dist.DistributedError, match="outside"):
        dist.initialize("10.0.0.1:1", 2, 2, environ={})
    with pytest.raises(dist.DistributedError, match="not an integer"):
        dist.initialize(environ={"SOFTGRPO_COORDINATOR": "h:1", "SOFTGRPO_NUM_PROCESSES": "two",
                                 "SOFTGRPO_PROCESS_ID": "0"})


def test_single_process_helpers():
    import jax
    import pytest

    from softgrpo_jax import distributed as dist

    mesh = dist.make_mesh((4, 2, 1))
    x = np.arange(48, dtype=np.float32).reshape(8, 6)
    g = dist.host_to_global(x, dist.batch_sharding(mesh, 2, 8))
    assert g.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(dist.to_host(g), x)
    np.testing.assert_array_equal(dist.local_rows(g), np.arange(8))
    np.testing.assert_array_equal(dist.allgather_rows(x[[3, 1, 0, 2]], [3, 1, 0, 2], 4), x[:4])
    with pytest.raises(dist.DistributedError, match="missing"):
        dist.allgather_rows(x[[3]], [3], 4)
    assert dist.to_host(jax.numpy.float32(2.5)) == 2.5


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["worker"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--pid", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--devices", type=int, default=8)
    worker(ap.parse_args())
