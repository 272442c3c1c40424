"""Prepare, on a machine that has the embedded default installed, what ``benchmarks/gpu_e2e.sh`` needs on a GPU machine
that cannot download anything and lacks the embedded model: the demo's reasoning-gym splits as prepared TFDS files, and
SmolLM2-135M-Instruct's Hugging Face config and tokenizer (no weights: the GPU side initialises them at random).

    python benchmarks/gpu_e2e_prep.py [--dest .gpu]       # then carry .gpu (about 4 MB) to the GPU machine
    python benchmarks/gpu_e2e_prep.py --dest /tmp/prep --config configs/demo_smollm2_smoke.py   # a smoke run

The GPU machine also needs this project's runtime dependencies; ones it lacks can travel as wheels (``pip wheel``
here, ``pip install --no-index`` there; `promise` has no wheel on PyPI: ``pip wheel --no-deps promise==2.3`` builds
one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def prepare_data(config: str, data_dir: str):
    """The config's train and eval splits prepared as TFDS files in ``data_dir`` (a machine without reasoning-gym
    reads them from there); returns (config, tokenizer)."""
    os.environ["SOFTGRPO_DATA_DIR"] = data_dir  # before the data modules read it
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from softgrpo_jax import load_tokenizer
    from softgrpo_jax.config import get_config
    from softgrpo_jax.train import load_problems

    cfg = get_config(config)
    tok = load_tokenizer(cfg.model.path)
    names = [(cfg.data.train, "train")] + [tuple(e.split(":")) if ":" in e else (e, "test") for e in cfg.data.eval]
    for name, split in names:
        ex, filtered = load_problems(cfg, name, split, tok)
        print(f"{name}:{split}: {len(ex)} prompts ({filtered} filtered)")
    return cfg, tok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=os.path.join(HERE, "..", ".gpu"))
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "demo_smollm2.py"))
    args = ap.parse_args(argv)
    dest = os.path.abspath(args.dest)
    cfg, tok = prepare_data(args.config, os.path.join(dest, "data"))
    from softgrpo_jax import load_pretrained, save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(load_pretrained(cfg.model.path), tmp, tokenizer=tok)
        os.makedirs(os.path.join(dest, "model"), exist_ok=True)
        for f in os.listdir(tmp):
            if "safetensors" not in f:
                shutil.copy(os.path.join(tmp, f), os.path.join(dest, "model", f))
    print("wrote", dest, sorted(os.listdir(os.path.join(dest, "model"))))


if __name__ == "__main__":
    sys.exit(main())
