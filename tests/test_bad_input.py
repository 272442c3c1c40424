"""Bad input, as a new user meets it on the command line: damaged files, wrong settings, odd prompts, a full disk.

Each case asserts the one-line message (``softgrpo: error: ...``, no traceback), the exit code, and that nothing the
user had was lost and nothing was left behind.
"""

import json
import os
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest

from helpers import make_hf_model, make_tiny_smollm_dir, xla_flags
from softgrpo_jax.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "demo_smollm2_smoke"  # a bundled config by its bare name


def _env(**extra):
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("SOFTGRPO_DEBUG", None)
    env.update(extra)
    return env


def _cli(args, *, input=None, env=None, fsize=None, timeout=300):
    """``softgrpo ARGS`` in a fresh process (the console script's own entry); ``fsize``: RLIMIT_FSIZE in bytes, a
    disk that is full for any file larger than that (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    cmd = [sys.executable, "-m", "softgrpo_jax.cli", *args]
    if fsize is not None:  # bash's ulimit -f counts 1024-byte blocks
        cmd = ["bash", "-c", f'ulimit -f {fsize // 1024} && exec "$@"', "bash", *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), input=input, capture_output=True, timeout=timeout)


def _one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one ``softgrpo: error:`` line and no traceback; returns it."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("softgrpo: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _fails(capsys, argv, *must):
    """``main(argv)`` in this process: exit code 2, one error line holding every string of ``must``."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = _one_error_line(err)
    for m in must:
        assert m in line, (m, line)
    return line


def _leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.startswith((".tmp-", ".old-"))]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("models") / "qwen")
    make_hf_model(d, "qwen2")  # no tokenizer files
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_smollm_dir(str(tmp_path_factory.mktemp("models") / "tiny"))


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------- convert: nothing lost
def test_convert_refuses_a_folder_of_other_files(qwen_dir, tmp_path, capsys):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("my notes")
    (dst / "sub").mkdir()
    (dst / "sub" / "data.bin").write_bytes(b"\x00\x01")
    _fails(capsys, ["convert", qwen_dir, str(dst)], str(dst), "not an export", "notes.txt", "--overwrite")
    assert (dst / "notes.txt").read_text() == "my notes" and (dst / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []
    # --overwrite: the user asked for it
    assert main(["convert", qwen_dir, str(dst), "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "softgrpo_export.json"]
    assert _leftovers(tmp_path) == []


def test_convert_never_replaces_its_own_source(qwen_dir, tmp_path, capsys):
    """--overwrite replaces the destination, never the model being read: not the source itself, and not a folder
    that holds it."""
    work = tmp_path / "work"
    src = _copy_model(qwen_dir, work / "src")
    (work / "notes.txt").write_text("my notes")
    for dst in (str(work), src):
        _fails(capsys, ["convert", src, dst, "--overwrite"], dst, "the model being read", "outside it")
    assert (work / "notes.txt").read_text() == "my notes"
    assert sorted(os.listdir(src)) == sorted(os.listdir(qwen_dir))
    assert main(["convert", src, str(work / "src" / "out")]) == 0  # inside the source: nothing of it is replaced
    assert sorted(os.listdir(src)) == sorted(os.listdir(qwen_dir) + ["out"])


def test_sigterm_while_writing_leaves_nothing_half_made(tmp_path):
    """A scheduler's SIGTERM during an export (outside the training loop, which finishes its step on it) interrupts
    like Ctrl-C: the half-written folder is removed, the earlier destination kept, exit code 130."""
    dst = tmp_path / "export"
    dst.mkdir()
    code = ("import os, signal, sys, time\n"
            "from softgrpo_jax.checkpoint.atomic import atomic_dir\n"
            "from softgrpo_jax.cli import _sigterm_interrupts\n"
            "try:\n"
            "    with _sigterm_interrupts():\n"
            f"        with atomic_dir({str(dst)!r}) as tmp:\n"
            "            open(os.path.join(tmp, 'weights.bin'), 'wb').write(b'x' * 1000)\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "            time.sleep(30)\n"
            "except KeyboardInterrupt:\n"
            "    sys.exit(130)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path)) == ["export"] and os.listdir(dst) == []


def test_convert_refuses_a_file_and_overwrite_cleans_up(qwen_dir, tmp_path, capsys):
    dst = tmp_path / "model.bin"
    dst.write_bytes(b"precious")
    _fails(capsys, ["convert", qwen_dir, str(dst)], str(dst), "is a file", "--overwrite")
    assert dst.read_bytes() == b"precious" and _leftovers(tmp_path) == []
    assert main(["convert", qwen_dir, str(dst), "--overwrite"]) == 0
    assert dst.is_dir() and (dst / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []  # the replaced file went, no hidden .old-* copy stays


def test_convert_replaces_its_own_export_only(qwen_dir, tmp_path, capsys):
    dst = tmp_path / "export"
    for fmt in ("hf", "orbax"):
        dst_f = tmp_path / f"export-{fmt}"
        assert main(["convert", qwen_dir, str(dst_f), "--format", fmt]) == 0
        assert main(["convert", qwen_dir, str(dst_f), "--format", fmt]) == 0  # an earlier export: replaced
        manifest = json.load(open(dst_f / "softgrpo_export.json"))
        assert manifest["written_by"] == "softgrpo_jax" and manifest["format"] == fmt
    assert main(["convert", qwen_dir, str(dst)]) == 0
    (dst / "README.md").write_text("my model card")  # the user added a file to the export
    _fails(capsys, ["convert", qwen_dir, str(dst)], "did not write", "README.md")
    assert (dst / "README.md").read_text() == "my model card"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", qwen_dir, str(empty)]) == 0  # an empty folder: nothing to lose
    assert _leftovers(tmp_path) == []


def test_save_pretrained_refuses_and_overwrites(qwen_dir, tmp_path):
    from softgrpo_jax import load_pretrained, save_pretrained
    from softgrpo_jax.checkpoint import CheckpointError

    m = load_pretrained(qwen_dir)
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "a.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not an export"):
        save_pretrained(m, str(dst))
    with pytest.raises(CheckpointError, match="not an export"):
        save_pretrained(m, str(dst), format="orbax")
    assert os.listdir(dst) == ["a.txt"]
    save_pretrained(m, str(dst), format="orbax", overwrite=True)
    assert "a.txt" not in os.listdir(dst) and "softgrpo_model.json" in os.listdir(dst)


def test_export_folders_get_the_umask_mode(qwen_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["convert", qwen_dir, str(tmp_path / "hf")]) == 0
        assert main(["convert", qwen_dir, str(tmp_path / "ob"), "--format", "orbax"]) == 0
    finally:
        os.umask(old)
    for d in ("hf", "ob"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o755, d
    assert stat.S_IMODE(os.stat(tmp_path / "hf" / "model.safetensors").st_mode) == 0o644


def test_full_disk_during_export(qwen_dir, tmp_path):
    """A write that fails (here: the file-size limit, EFBIG, as a full disk gives ENOSPC) leaves nothing: no
    destination, no temporary folder; an earlier export stays as it was."""
    size = os.path.getsize(os.path.join(qwen_dir, "model.safetensors"))
    dst = tmp_path / "out"
    r = _cli(["convert", qwen_dir, str(dst)], fsize=size // 2)
    line = _one_error_line(r.stderr.decode())
    assert r.returncode == 2 and "could not write" in line and str(dst) in line and "File too large" in line
    assert not dst.exists() and _leftovers(tmp_path) == []
    assert main(["convert", qwen_dir, str(dst)]) == 0
    before = {f: (dst / f).read_bytes() for f in os.listdir(dst)}
    r = _cli(["convert", qwen_dir, str(dst)], fsize=size // 2)
    assert r.returncode == 2 and "nothing at" in _one_error_line(r.stderr.decode())
    assert {f: (dst / f).read_bytes() for f in os.listdir(dst)} == before and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------- damaged checkpoints
def _edit_config(d, **kw):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))


def test_unsupported_architecture_hf_and_gguf(qwen_dir, tmp_path, capsys):
    import gguf

    d = _copy_model(qwen_dir, tmp_path / "mistral")
    _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral")
    _fails(capsys, ["convert", d, str(tmp_path / "x")], "config.json", "MistralForCausalLM", "Qwen2 and Llama")
    path = str(tmp_path / "gemma.gguf")
    w = gguf.GGUFWriter(path, "gemma2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails(capsys, ["convert", path, str(tmp_path / "y")], path, "'gemma2'")
    _fails(capsys, ["sample", "--model", path, "--max-new-tokens", "2"], path)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_config_json_not_json(qwen_dir, tmp_path, capsys):
    d = _copy_model(qwen_dir, tmp_path / "m")
    with open(os.path.join(d, "config.json"), "a") as f:
        f.write("}{ trailing")
    _fails(capsys, ["convert", d, str(tmp_path / "x")], "config.json", "not valid JSON", "line")
    json.dump([1, 2], open(os.path.join(d, "config.json"), "w"))
    _fails(capsys, ["convert", d, str(tmp_path / "x")], "config.json", "expected an object")
    json.dump({"architectures": ["Qwen2ForCausalLM"]}, open(os.path.join(d, "config.json"), "w"))
    _fails(capsys, ["convert", d, str(tmp_path / "x")], "config.json", "'num_attention_heads'")


def _header_file(path, header, data=b""):
    hb = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)


def test_damaged_safetensors(qwen_dir, tmp_path, capsys):
    d = _copy_model(qwen_dir, tmp_path / "m")
    st = os.path.join(d, "model.safetensors")
    good = open(st, "rb").read()
    cases = {
        "truncated": lambda: open(st, "wb").write(good[: len(good) // 2]),
        "empty": lambda: open(st, "wb").write(b""),
        "header a list": lambda: _header_file(st, [1, 2, 3]),
        "header a string": lambda: _header_file(st, "model"),
        "offsets disagree with the shape": lambda: _header_file(
            st, {"model.embed_tokens.weight": {"dtype": "F32", "shape": [131, 64], "data_offsets": [0, 16]}},
            b"\x00" * 16),
        "header not JSON": lambda: open(st, "wb").write(struct.pack("<Q", 6) + b"{nope}"),
        "header length absurd": lambda: open(st, "wb").write(struct.pack("<Q", 1 << 60) + b"{}"),
    }
    for what, damage in cases.items():
        damage()
        line = _fails(capsys, ["convert", d, str(tmp_path / "x")], st, "not a readable safetensors file")
        assert "re-download" in line, (what, line)
        assert not (tmp_path / "x").exists() and _leftovers(tmp_path) == []


def test_safetensors_reader_bf16_and_writer_roundtrip(tmp_path):
    """The package's reader holds bfloat16 as ml_dtypes.bfloat16 (no torch); what we write, torch reads."""
    import ml_dtypes
    import torch
    from safetensors.torch import load_file

    from softgrpo_jax.checkpoint import safetensors_io as st

    a = (np.arange(12, dtype=np.float32).reshape(3, 4) / 7).astype(ml_dtypes.bfloat16)
    b = np.arange(5, dtype=np.float16)
    p = str(tmp_path / "x.safetensors")
    st.write_file(p, {"a": a, "b": b})
    got = dict(st.iter_tensors(p))
    assert got["a"].dtype == ml_dtypes.bfloat16 and np.array_equal(got["a"], a) and np.array_equal(got["b"], b)
    t = load_file(p)
    assert t["a"].dtype == torch.bfloat16 and np.array_equal(t["a"].float().numpy(), a.astype(np.float32))


# ---------------------------------------------------------------------------------------- configs
def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("from softgrpo_jax.config import base_config\n\ndef get_config(:\n    return base_config()\n")
    _fails(capsys, ["train", "--config", str(bad)], str(bad), "line 3", "syntax error")
    bad.write_text("from softgrpo_jax.config import base_config\n\ndef get_config():\n    c = base_config()\n"
                   "    c.rl.group_size = 1 / 0\n    return c\n")
    _fails(capsys, ["train", "--config", str(bad)], str(bad), "line 5", "ZeroDivisionError")
    bad.write_text("X = 1\n")
    _fails(capsys, ["train", "--config", str(bad)], "defines no get_config()")
    _fails(capsys, ["train", "--config", str(tmp_path)], "is a folder")


def test_a_mistyped_config_path_is_not_a_bundled_config(tmp_path, capsys):
    """``--config /some/dir/demo_smollm2_smoke.py`` that does not exist used to run the bundled config of that
    name; a path is a path, bundled configs go by bare name."""
    out = tmp_path / "run"
    _fails(capsys, ["train", "--config", str(tmp_path / "demo_smollm2_smoke.py"),
                    f"--config.trainer.output_dir={out}"], "not found", "bare name")
    _fails(capsys, ["train", "--config", "demo_smolm2_smoke"], "Did you mean demo_smollm2_smoke")
    # the bare name (with or without .py) is the bundled config: it gets as far as its settings
    for name in (SMOKE, SMOKE + ".py"):
        _fails(capsys, ["train", "--config", name, "--config.rl.group_size=0", f"--config.trainer.output_dir={out}"],
               "rl.group_size=0")
    assert not out.exists()


@pytest.mark.parametrize("overrides,must", [
    (["--config.rl.group_size=0"], ["rl.group_size=0", ">= 1"]),
    (["--config.rl.group_size=-3"], ["rl.group_size=-3"]),
    (["--config.rl.train_batch_size=3"], ["rl.train_batch_size=3", "rl.mini_batch_size=2"]),
    (["--config.rl.micro_batch_size=3"], ["rl.micro_batch_size=3", "does not split"]),
    (["--config.rl.new_shape_cost=-0.5"], ["rl.new_shape_cost=-0.5 must be >= 0 and finite"]),
    (["--config.trainer.mesh=(0,1,1)"], ["trainer.mesh"]),
    (["--config.rollout.mode=hard", "--config.rollout.top_p=0"], ["rollout.mode='hard'", "rollout.top_p=0"]),
    (["--config.data.train=gsm9k"], ["data.train='gsm9k'"]),
    (["--config.rl.kl_type=k9"], ["kl_type"]),
    (["--config.rollout.fuse_projections=maybe"], ["rollout.fuse_projections", "expected a bool"]),
    (["--config.rl.grup_size=2"], ["unknown config key 'rl.grup_size'", "Did you mean rl.group_size"]),
    (["--config.rollout.temperature=0.7"], ["rl.train_temperature=1.0 differs from rollout.temperature=0.7"]),
    (["--config.data.reasoning_gym.tasks=basic_arithmatic,gcd"],
     ["data.reasoning_gym.tasks", "no task 'basic_arithmatic'", "did you mean basic_arithmetic"]),
    (["--config.data.reasoning_gym.tasks=(('gcd', 'x'),)"], ["task 'gcd': the weight 'x' is not a number"]),
    (["--config.data.reasoning_gym.tasks=(('gcd', 0), ('lcm', 0))"], ["the task weights sum to 0"]),
    (["--config.data.reasoning_gym.tasks=(('chain_sum', 1, (('min_terms', -2),)),)"],
     ["task 'chain_sum' refuses the settings {'min_terms': -2}"]),
    (["--config.data.reasoning_gym.tasks=(('gcd', 1, (('nope', 1),)),)"], ["task 'gcd' refuses", "nope"]),
    (["--config.data.reasoning_gym.tasks=(5)"], ["data.reasoning_gym.tasks: not a Python literal of tasks"]),
    (["--config.data.reasoning_gym.tasks=(('gcd', 1, (('seed', 3),)),)"], ["task 'gcd': its seed and size come"]),
])
def test_settings_fail_before_loading_and_leave_no_folder(tmp_path, capsys, overrides, must):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--config", SMOKE, f"--config.model.path={tmp_path / 'no-such-model'}",
                    f"--config.trainer.output_dir={out}", *overrides], *must)
    assert not out.exists()


def test_device_dependent_settings_fail_before_loading(tmp_path, capsys):
    """Micro-batches per data-parallel device need the device count (8 simulated here): checked before the model
    (a path that does not even exist) is looked at, and no output folder is made."""
    out = tmp_path / "run"
    _fails(capsys, ["train", "--config", SMOKE, f"--config.model.path={tmp_path / 'no-such-model'}",
                    f"--config.trainer.output_dir={out}", "--config.trainer.mesh=(-1,1,1)"],
           "does not split", "8 devices", "trainer.mesh")
    _fails(capsys, ["train", "--config", SMOKE, f"--config.model.path={tmp_path / 'no-such-model'}",
                    f"--config.trainer.output_dir={out}", "--config.trainer.mesh=(3,1,1)"],
           "needs 3 devices, have 8")
    _fails(capsys, ["train", "--config", SMOKE, f"--config.model.path={tmp_path / 'no-such-model'}",
                    f"--config.trainer.output_dir={out}", "--config.trainer.mesh=(1,1,-1)"],
           "model.path", "does not exist")
    assert not out.exists()
    _fails(capsys, ["plan", "--config", SMOKE, "--mesh", "1,x,1"], "--mesh")


def test_a_run_never_exports_over_the_users_files(tmp_path, capsys):
    """A run writes its final model to <output_dir>/hf_export: a folder there that is not an earlier export is
    refused at start-up (not after hours of training)."""
    out = tmp_path / "run"
    (out / "hf_export").mkdir(parents=True)
    (out / "hf_export" / "notes.txt").write_text("mine")
    _fails(capsys, ["train", "--config", SMOKE, f"--config.trainer.output_dir={out}", "--config.trainer.mesh=(1,1,-1)",
                    "--config.model.path=smollm2"], "hf_export", "not an export", "trainer.export_hf=false")
    assert (out / "hf_export" / "notes.txt").read_text() == "mine" and os.listdir(out) == ["hf_export"]


# ---------------------------------------------------------------------------------------- data
def test_training_split_emptied_by_the_prompt_filter(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--config", SMOKE, f"--config.model.path={tiny_dir}", f"--config.trainer.output_dir={out}",
                    "--config.trainer.mesh=(1,1,-1)", "--config.data.max_prompt_length=8"],
           "has 0 problems", "data.max_prompt_length=8", "rl.train_batch_size=2")
    assert not out.exists()


def test_empty_and_undecodable_data_files(tiny_dir, tmp_path, capsys):
    manual = tmp_path / "manual"
    manual.mkdir()
    out = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"--config.model.path={tiny_dir}", f"--config.trainer.output_dir={out}",
            "--config.trainer.mesh=(1,1,-1)", "--config.data.train=deepscaler",
            f"--config.data.manual_dir={manual}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    f = manual / "deepscaler.jsonl"
    f.write_bytes(b"")
    _fails(capsys, args, str(f), "holds no rows")
    f.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    _fails(capsys, args, str(f), "not UTF-8", "line 2")
    f.write_bytes(b'{"x": 1}\n')
    _fails(capsys, args, str(f), "no usable rows", "question")
    assert not out.exists()
    assert f.read_bytes() == b'{"x": 1}\n'


# ---------------------------------------------------------------------------------------- prompts
def test_prompt_too_long_for_the_context(tiny_dir, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("seven " * 400)
    _fails(capsys, ["sample", "--model", tiny_dir, "--prompt-file", str(long), "--max-new-tokens", "4"],
           "the prompt alone is", "context of 256 tokens", "shorten the prompt")
    _fails(capsys, ["sample", "--model", tiny_dir, "--prompt", "What is 2 + 2?", "--max-new-tokens", "1000"],
           "--max-new-tokens 1000", "context of 256 tokens", "lower --max-new-tokens to")


def test_prompt_file_encoding_and_empty_prompts(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("What is caf\xe9 + 1?".encode("latin-1"))
    _fails(capsys, ["sample", "--model", tiny_dir, "--prompt-file", str(bad)], str(bad), "not UTF-8", "0xe9")
    _fails(capsys, ["sample", "--model", tiny_dir, "--prompt", ""], "is empty", "--prompt-file")
    _fails(capsys, ["sample", "--model", tiny_dir, "--prompt", "  \n\t"], "is empty")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(capsys, ["sample", "--model", tiny_dir, "--prompt-file", str(empty)], str(empty), "is empty")
    _fails(capsys, ["sample", "--model", tiny_dir, "--prompt-file", str(tmp_path / "nope.txt")],
           "nope.txt", "No such file")
    _fails(capsys, ["sample", "--model", tiny_dir, "--n", "0"], "--n 0")


def test_prompt_from_stdin_and_undecodable_argv(tiny_dir):
    r = _cli(["sample", "--model", tiny_dir, "--prompt-file", "-", "--max-new-tokens", "3", "--mode", "discrete"],
             input="What is 2 + 2?\n".encode())
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert "=== sample 0 (discrete" in r.stdout.decode()
    r = _cli(["sample", "--model", tiny_dir, "--prompt-file", "-"], input=b"\xff\xfe not utf-8")
    assert r.returncode == 2 and "standard input is not UTF-8" in _one_error_line(r.stderr.decode())
    # bytes that are not UTF-8 on the command line (Python keeps them as lone surrogates)
    r = subprocess.run([sys.executable.encode(), b"-m", b"softgrpo_jax.cli", b"sample", b"--model",
                        tiny_dir.encode(), b"--prompt", b"caf\xe9?"], cwd=REPO, env=_env(), capture_output=True,
                       timeout=300)
    assert r.returncode == 2 and "not valid UTF-8" in _one_error_line(r.stderr.decode())


def test_missing_tokenizer_is_an_error_naming_the_folder(qwen_dir, tmp_path, capsys):
    _fails(capsys, ["sample", "--model", qwen_dir, "--max-new-tokens", "2"], qwen_dir, "no tokenizer files")
    # convert still converts the weights, says so, and writes no made-up tokenizer
    dst = tmp_path / "out"
    assert main(["convert", qwen_dir, str(dst)]) == 0
    err = capsys.readouterr().err
    assert "no tokenizer copied" in err and "Traceback" not in err
    assert not [f for f in os.listdir(dst) if f.startswith(("tokenizer", "special_tokens", "vocab"))]


def _escape_model(path, tok_dir):
    """A tiny Llama whose every next token is ESC (0x1b): the layers add nothing, dimension 0 of every embedding is
    1, the final norm keeps only that dimension, and only ESC's output row reads it."""
    import torch

    from softgrpo_jax import load_tokenizer

    tok = load_tokenizer(tok_dir)
    esc = tok("\x1b", add_special_tokens=False)["input_ids"]
    assert len(esc) == 1
    model = make_hf_model(path, "llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith(("o_proj.weight", "down_proj.weight")):
                v.zero_()
        sd["model.embed_tokens.weight"][:, 0] = 1.0
        sd["model.norm.weight"].zero_()
        sd["model.norm.weight"][0] = 1.0
        sd["lm_head.weight"].zero_()
        sd["lm_head.weight"][esc[0], 0] = 10.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_model_text_with_terminal_escapes_is_printed_escaped(tiny_dir, tmp_path, capsys):
    d = _escape_model(str(tmp_path / "esc"), tiny_dir)
    assert main(["sample", "--model", d, "--mode", "discrete", "--top-k", "1", "--max-new-tokens", "4",
                 "--raw", "--prompt", "hi"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b\\x1b" in out


def test_printable():
    from softgrpo_jax.errors import printable

    assert printable("a\x1b[2Jb\n\tc\x07\u202e\x9b") == "a\\x1b[2Jb\n\tc\\x07\\u202e\\x9b"
    assert printable("caf\udce9") == "caf\\xe9"  # an undecodable byte from argv
    assert printable("a\nb", keep="") == "a\\x0ab"


# ---------------------------------------------------------------------------------------- --debug, exit codes
def test_debug_shows_the_traceback(tmp_path):
    args = ["train", "--config", str(tmp_path / "nope.py")]
    r = _cli(args)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [_one_error_line(r.stderr.decode())]
    for extra, env in ((["--debug"], None), ([], _env(SOFTGRPO_DEBUG="1"))):
        r = _cli(args + extra, env=env)
        err = r.stderr.decode()
        assert r.returncode == 1 and "Traceback" in err and "ConfigError" in err, err
    r = _cli(["--debug"] + args)  # before the command too
    assert r.returncode == 1 and "Traceback" in r.stderr.decode()


@pytest.mark.slow
def test_full_disk_during_a_checkpoint(tiny_dir, tmp_path):
    """The step-1 checkpoint cannot be written (file-size limit below the embedding's size): one line naming the
    checkpoint folder, exit code 2, orbax's half-written step removed, no traceback."""
    out = tmp_path / "run"
    r = _cli(["train", "--config", SMOKE, f"--config.model.path={tiny_dir}", f"--config.trainer.output_dir={out}",
              "--config.trainer.total_steps=1", "--config.trainer.eval_before=false",
              "--config.trainer.progress=false", "--config.trainer.export_hf=false",
              "--config.trainer.tensorboard=false"], fsize=3_000_000, timeout=600)
    err = r.stderr.decode()
    line = _one_error_line(err)
    assert r.returncode == 2, err[-3000:]
    assert "could not write the checkpoint of step 1" in line and "File too large" in line
    assert "resume" in line
    ck = out / "checkpoints"
    assert not [f for f in os.listdir(ck) if "tmp" in f], os.listdir(ck)


# ---------------------------------------------------------------------------------------- launchers
def _alive(pid: int) -> bool:
    """A process that runs (not gone, not a zombie left for a parent that does not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fake(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_local_launcher_logs_in_a_private_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # what another user could plant under the old fixed names
    os.symlink(victim, tmpdir / "softgrpo_local_0.log")
    fake = _fake(tmp_path / "softgrpo", "#!/bin/sh\necho \"fake softgrpo $*\"\n")
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "local_cpu.sh"), "1", "1", "--config", "x y"],
                       env=dict(os.environ, TMPDIR=str(tmpdir), SOFTGRPO=fake, PORT="1"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep me"
    logs = [d for d in os.listdir(tmpdir) if d.startswith("softgrpo_local.")]
    assert len(logs) == 1 and stat.S_IMODE(os.stat(tmpdir / logs[0]).st_mode) == 0o700
    log = (tmpdir / logs[0] / "process_0.log").read_text()
    assert "train --coordinator 127.0.0.1:1 --num-processes 1 --process-id 0" in log and "--config x y" in log
    assert "fake softgrpo" in r.stdout


def test_tpu_launcher_uses_no_shared_fixed_paths(tmp_path):
    """``launch/tpu_pod.sh`` against a fake ``gcloud`` that runs the remote commands in a fake worker's home: the
    source tarball is a private temporary file here and a file in the home folder there (removed after
    extraction), logs and the pid file live under REMOTE_DIR, every remote path is quoted (a space in it works)."""
    home = tmp_path / "worker home"
    home.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.txt"
    _fake(bindir / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {json.dumps(str(calls))}
cmd=""; args=()
for a in "$@"; do case "$a" in --command=*) cmd=${{a#--command=}} ;; --*) ;; *) args+=("$a") ;; esac; done
cd {json.dumps(str(home))}
export HOME={json.dumps(str(home))}
if [ "${{args[3]}}" = scp ]; then cp "${{args[4]}}" "${{args[5]#*:}}"; else bash -c "$cmd"; fi
""")
    # the worker's python3: a venv whose pip and python do nothing (no network here)
    _fake(bindir / "python3", """#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"
  printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/pip"; printf '#!/bin/sh\\necho 1 1 cpu\\n' > "$3/bin/python"
  chmod +x "$3/bin/pip" "$3/bin/python"; fi
""")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="z",
               REMOTE_DIR="~/soft grpo", TMPDIR=str(tmpdir))
    script = os.path.join(REPO, "launch", "tpu_pod.sh")
    r = subprocess.run(["bash", script, "setup"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rdir = home / "soft grpo"
    assert (rdir / "pyproject.toml").is_file() and (rdir / "launch" / "tpu_pod.sh").is_file()
    assert not [f for f in os.listdir(home) if f.endswith(".tgz")]  # the uploaded tarball was removed
    assert os.listdir(tmpdir) == []  # and the local one
    # train: a fake softgrpo that waits for SIGTERM
    _fake(rdir / ".venv" / "bin" / "softgrpo", "#!/usr/bin/env bash\necho \"args: $*\"\n"
          "trap 'echo stopped; exit 0' TERM\nwhile true; do sleep 0.1; done\n")
    r = subprocess.run(["bash", script, "train", "--config", "deepscaler_1p5b", "--config.name=a b"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = int((rdir / "logs" / "softgrpo.pid").read_text())
    import time

    t0 = time.time()
    while "args:" not in (rdir / "logs" / "train.log").read_text() and time.time() - t0 < 20:
        time.sleep(0.1)
    assert "args: train --distributed on --config deepscaler_1p5b --config.name=a b" in (
        rdir / "logs" / "train.log").read_text()
    r = subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    t0 = time.time()
    while _alive(pid) and time.time() - t0 < 20:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, 9)
        pytest.fail("stop did not stop the process")
    assert "stopped" in (rdir / "logs" / "train.log").read_text()
    remote = [ln.split("--command=", 1)[1] for ln in calls.read_text().splitlines() if "--command=" in ln]
    remote += [w.split(":", 1)[1] for ln in calls.read_text().splitlines() for w in ln.split() if w.startswith("pod:")]
    assert len(remote) == 4 and not [r for r in remote if "/tmp" in r], remote  # nothing in a worker's shared /tmp


def test_closed_loop_reports_dropped_on_every_path():
    """The reports a failed orbax save leaves behind (``RuntimeError('Event loop is closed')`` from write callbacks)
    are dropped whichever hook Python reports them by; any other error on those paths is still printed."""
    code = r'''
import sys, threading
from softgrpo_jax.train import _quiet_background_tracebacks
with _quiet_background_tracebacks():
    pass
closed, other = RuntimeError("Event loop is closed"), ValueError("something else")
for e in (closed, other):
    try:
        raise e
    except Exception as x:
        sys.excepthook(type(x), x, x.__traceback__)
    def boom(e=e):
        raise e
    t = threading.Thread(target=boom); t.start(); t.join()
    class D:
        def __del__(self, e=e):
            raise e
    D()
'''
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Event loop is closed" not in err, err
    assert err.count("ValueError: something else") == 3, err
