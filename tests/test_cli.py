"""The command line: convert, sample, eval, train (interrupted with SIGINT and resumed) and the demo smoke run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import make_hf_model, make_tiny_smollm_dir, xla_flags
from softgrpo_jax.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices=1, fast_compile=True):
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices) if fast_compile else f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_convert_hf_orbax_hf(tmp_path, capsys):
    from softgrpo_jax import load_pretrained

    src = str(tmp_path / "hf")
    make_hf_model(src, "qwen2")
    assert main(["convert", src, str(tmp_path / "ob"), "--format", "orbax"]) == 0
    assert main(["convert", str(tmp_path / "ob"), str(tmp_path / "hf2")]) == 0
    a, b = load_pretrained(src), load_pretrained(str(tmp_path / "hf2"))
    ids = np.arange(12).reshape(2, 6) % a.config.vocab_size
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sample_prints_trace(tmp_path, capsys, monkeypatch):
    d = make_tiny_smollm_dir(str(tmp_path / "m"))
    assert main(["sample", "--model", d, "--mode", "gumbel", "--max-new-tokens", "8", "--show-topk", "3",
                 "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== sample") == 2 and "step    0" in out and "thinking (argmax tokens)" in out
    # the decoding dtype: explicit, and "auto" (the default) by the host's CPU flags
    import softgrpo_jax.models.config as C

    for flags, expect in ((frozenset({"avx2", "fma"}), "float32"), (frozenset({"avx2", "amx_bf16"}), "bfloat16")):
        monkeypatch.setattr(C, "cpu_flags", lambda *a, f=flags: f)
        assert main(["sample", "--model", d, "--mode", "gumbel", "--max-new-tokens", "4"]) == 0
        assert f"=== sample 0 (gumbel, {expect};" in capsys.readouterr().out
    assert main(["sample", "--model", d, "--mode", "discrete", "--max-new-tokens", "4",
                 "--compute-dtype", "bfloat16"]) == 0
    assert "=== sample 0 (discrete, bfloat16;" in capsys.readouterr().out


def test_unknown_config_key_fails_cleanly(capsys):
    assert main(["train", "--config", "configs/demo_smollm2_smoke.py", "--config.rl.grup_size=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'rl.grup_size'" in err and "rl.group_size" in err


def test_eval_writes_reports(tmp_path):
    d = make_tiny_smollm_dir(str(tmp_path / "m"))
    out = str(tmp_path / "ev")
    rc = main(["eval", "--config", "configs/demo_smollm2_smoke.py", f"--config.model.path={d}",
               f"--config.trainer.output_dir={out}", "--config.eval.n_samples=3", "--config.eval.ks=(1,2,4)",
               "--config.data.eval_limit=3", "--config.trainer.mesh=(1,1,-1)"])
    assert rc == 0
    s = json.load(open(os.path.join(out, "eval", "summary.json")))["summaries"]["reasoning_gym"]
    assert s["n_problems"] == 3 and s["n_samples"] == 3
    for k in ("pass@1", "pass@2", "unbiased_pass@2", "maj@2", "mean_response_tokens"):
        assert k in s
    assert os.path.getsize(os.path.join(out, "eval", "pass_at_k.png")) > 1000
    # a second evaluation into the same folder keeps the first one beside it
    rc = main(["eval", "--config", "configs/demo_smollm2_smoke.py", f"--config.model.path={d}",
               f"--config.trainer.output_dir={out}", "--config.eval.n_samples=2", "--config.eval.ks=(1,2)",
               "--config.data.eval_limit=2", "--config.trainer.mesh=(1,1,-1)"])
    assert rc == 0
    new = json.load(open(os.path.join(out, "eval", "summary.json")))["summaries"]["reasoning_gym"]
    old = json.load(open(os.path.join(out, "eval.1", "summary.json")))["summaries"]["reasoning_gym"]
    assert (new["n_problems"], new["n_samples"]) == (2, 2) and old == s


def test_train_sigint_then_resume(tmp_path):
    d = make_tiny_smollm_dir(str(tmp_path / "m"))
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "softgrpo_jax.cli", "train", "--config", "configs/demo_smollm2_smoke.py",
           f"--config.model.path={d}", f"--config.trainer.output_dir={out}", "--config.trainer.total_steps=40",
           "--config.trainer.save_every=1000", "--config.trainer.eval_before=false", "--config.data.eval_limit=2",
           "--config.trainer.progress=false"]
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < 240:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
            break
        if p.poll() is not None:
            pytest.fail("train exited early:\n" + p.stdout.read())
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=240)[0]
    assert p.returncode == 130, log
    saved = sorted(int(x) for x in os.listdir(os.path.join(out, "checkpoints")) if x.isdigit())
    assert saved, log  # the interrupt saved a checkpoint although save_every is 1000
    done = [json.loads(line)["step"] for line in open(metrics)]
    assert done == list(range(1, saved[-1] + 1))
    # every step counts the responses whose reward check did not finish (none here: a 5 s limit, tiny answers)
    assert all(json.loads(line)["reward_unverified"] == 0 for line in open(metrics))
    # resume: the same command with fewer total steps finishes from the checkpoint
    cmd[cmd.index("--config.trainer.total_steps=40")] = f"--config.trainer.total_steps={saved[-1] + 1}"
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout + r.stderr
    steps = [json.loads(line)["step"] for line in open(metrics) if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, saved[-1] + 2))
    assert os.path.isfile(os.path.join(out, "hf_export", "config.json"))


def test_compilation_cache_serves_the_next_process(tmp_path):
    """trainer.compilation_cache: the first `softgrpo train` process writes its compiled programs to the cache folder;
    a second, identical one finds every program there (it writes nothing new) and trains to the same metrics."""
    d = make_tiny_smollm_dir(str(tmp_path / "m"))
    cache = tmp_path / "cache"
    env = dict(_env(), SOFTGRPO_COMPILATION_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_DEBUG_LOG_MODULES="jax._src.compiler")  # logs each persistent-cache hit
    entries, metrics, hits = [], [], []
    for run in ("a", "b"):
        out = str(tmp_path / run)
        r = subprocess.run([sys.executable, "-m", "softgrpo_jax.cli", "train", "--config", "configs/demo_smollm2_smoke.py",
                            f"--config.model.path={d}", f"--config.trainer.output_dir={out}",
                            "--config.trainer.total_steps=1", "--config.trainer.eval_before=false",
                            "--config.data.eval_limit=2", "--config.trainer.progress=false",
                            "--config.trainer.export_hf=false"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        hits.append((r.stdout + r.stderr).count("Persistent compilation cache hit"))
        entries.append(set(os.listdir(cache)))
        metrics.append([json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))])
    assert len(entries[0]) >= 3, entries[0]  # rollout, log-prob and update programs at least
    assert entries[1] == entries[0]
    assert hits[0] == 0 and hits[1] >= len(entries[0]), hits
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]] == [1]
    for a, b in zip(*metrics):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if "time" not in k and "per_s" not in k:
                assert b[k] == v, (k, v, b[k])


def test_compilation_cache_setting(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    from softgrpo_jax.train import enable_compilation_cache

    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir  # the test session's own cache (conftest), set aside meanwhile
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()  # JAX keeps the cache it opened until reset
    try:
        assert enable_compilation_cache("off") is None and enable_compilation_cache("") is None
        monkeypatch.setenv("SOFTGRPO_COMPILATION_CACHE", "off")
        assert enable_compilation_cache("auto") is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("SOFTGRPO_COMPILATION_CACHE", str(tmp_path / "env"))
        assert enable_compilation_cache("auto") == str(tmp_path / "env") and (tmp_path / "env").is_dir()
        # a folder already in use is kept: one process, one cache
        assert enable_compilation_cache(str(tmp_path / "other")) == str(tmp_path / "env")
        assert not (tmp_path / "other").exists()
        # a process that compiled before the cache was set (JAX decides at the first compile) still uses it
        jax.config.update("jax_compilation_cache_dir", None)
        jax.jit(lambda x: x * 3)(np.ones(3)).block_until_ready()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        assert enable_compilation_cache(str(tmp_path / "late")) == str(tmp_path / "late")
        jax.jit(lambda x: jnp.sin(x) * 5.25)(np.ones(3)).block_until_ready()
        assert os.listdir(tmp_path / "late")
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.delenv("SOFTGRPO_COMPILATION_CACHE")
        monkeypatch.setenv("SOFTGRPO_CACHE", str(tmp_path / "project"))
        assert enable_compilation_cache("auto") == str(tmp_path / "project" / "jax")
        jax.config.update("jax_compilation_cache_dir", None)
        assert enable_compilation_cache("gs://bucket/jax-cache") == "gs://bucket/jax-cache"  # left to JAX to open
        assert not os.path.exists("gs:")
        jax.config.update("jax_compilation_cache_dir", None)
        blocker = tmp_path / "file"
        blocker.write_text("x")
        assert enable_compilation_cache(str(blocker / "sub")) is None  # not creatable: no cache, no error
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path):
    """The README's main job at its smoke setting, on the real embedded SmolLM2-135M; the export loads in
    transformers and gives our logits."""
    import torch
    import transformers

    from softgrpo_jax import load_pretrained

    out = str(tmp_path / "demo")
    cmd = [sys.executable, "-m", "softgrpo_jax.cli", "demo", "--config", "configs/demo_smollm2_smoke.py",
           f"--config.trainer.output_dir={out}", "--config.trainer.progress=false"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=_env(fast_compile=False), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"demo smoke: {time.time() - t0:.0f} s")
    report = open(os.path.join(out, "report.md")).read()
    assert "| reasoning_gym | pass@1 |" in report and os.path.getsize(os.path.join(out, "curves.png")) > 1000
    train = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in train if m["kind"] == "train"] == [1, 2]
    hf = os.path.join(out, "hf_export")
    tm = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ours = load_pretrained(hf)
    ids = np.array([[1, 504, 3060, 28, 253, 2]])
    with torch.no_grad():
        ref = tm(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours(ids)) - ref).max() < 1e-3
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert tok.decode(tok("7 + 8 = 15")["input_ids"], skip_special_tokens=True) == "7 + 8 = 15"


# ------------------------------------------------------------------------------------------ huge pages
def test_hugepage_env():
    from softgrpo_jax.cli import HUGEPAGE_TUNABLE, hugepage_env

    if not sys.platform.startswith("linux"):
        assert hugepage_env({}) is None
        return
    assert hugepage_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": HUGEPAGE_TUNABLE}
    assert hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:" + HUGEPAGE_TUNABLE)
    assert hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stands
    for off in ("0", "off", "False"):
        assert hugepage_env({"SOFTGRPO_HUGEPAGES": off}) is None


def _thp_available():
    """Transparent huge pages that glibc's tunable can ask for: a kernel with THP not set to "never" and glibc >=
    2.35 (the first with ``glibc.malloc.hugetlb``; older ones ignore it)."""
    import platform

    lib, ver = platform.libc_ver()
    if lib != "glibc" or tuple(int(x) for x in ver.split(".")[:2]) < (2, 35):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_entry_reexecutes_with_hugepages():
    """The console script re-executes itself once with the tunable, keeps the user's tunables, and (where the kernel
    has transparent huge pages) a 256 MB block then faults in 2 MB pages instead of 4 KiB ones."""
    code = ("import ctypes, os, resource, sys\n"
            "libc = ctypes.CDLL(None)\n"
            "libc.malloc.restype = ctypes.c_void_p\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "ctypes.memset(libc.malloc(1 << 28), 1, 1 << 28)\n"  # 256 MB through malloc (its own mmap), written
            "print('FAULTS=%d' % (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0))\n"
            "print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))\n"
            "sys.argv = ['softgrpo', 'convert', '--help']\n"
            "from softgrpo_jax.cli import entry\n"
            "entry()\n")
    env = {k: v for k, v in _env().items() if k != "SOFTGRPO_HUGEPAGES"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.check=0"
    runs = {}
    for setting in ("", "0"):
        if setting:
            env["SOFTGRPO_HUGEPAGES"] = setting
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "usage: softgrpo convert" in r.stdout
        runs[setting] = r.stdout.splitlines()
    tun = lambda lines: [x.split("=", 1)[1] for x in lines if x.startswith("TUNABLES=")]  # noqa: E731
    faults = lambda lines: [int(x.split("=")[1]) for x in lines if x.startswith("FAULTS=")]  # noqa: E731
    assert tun(runs[""]) == ["glibc.malloc.check=0", "glibc.malloc.check=0:glibc.malloc.hugetlb=1"]
    assert tun(runs["0"]) == ["glibc.malloc.check=0"]  # SOFTGRPO_HUGEPAGES=0: no re-execution
    before, after = faults(runs[""])
    assert before >= 60000  # 4 KiB pages: 65536 for 256 MB
    if _thp_available():
        assert after < before / 8, (before, after)
