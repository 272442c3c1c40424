"""``load_pretrained`` / ``save_pretrained``: one entry for HF directories, GGUF files and orbax checkpoints."""

from __future__ import annotations

import os

from softgrpo_jax.checkpoint.atomic import check_destination  # noqa: F401 - re-exported
from softgrpo_jax.checkpoint.hf import CheckpointError, hf_model_config, load_hf, save_hf
from softgrpo_jax.checkpoint.orbax_io import is_orbax_model, load_orbax, save_orbax
from softgrpo_jax.models.config import ModelConfig
from softgrpo_jax.models.transformer import Transformer

EMBEDDED_ALIASES = ("smollm2", "smollm2-135m", "embedded")


def _is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def is_train_checkpoint(path: str) -> bool:
    """A step folder the trainer wrote (``<output_dir>/checkpoints/<step>``: orbax items params, opt_state, meta)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta", "metadata"))
            and os.path.isdir(os.path.join(path, "params")))


def train_checkpoint_base(path: str) -> str:
    """The model a training checkpoint's run started from (its ``model.path``): where its architecture and
    tokenizer come from. A relative path is read as the run read it, from the current folder."""
    from softgrpo_jax.checkpoint.hf import read_json_object

    where = os.path.join(path, "meta", "metadata")
    meta = read_json_object(where, "the run's metadata")
    cfg = meta.get("config")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    base = model.get("path") if isinstance(model, dict) else None
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{where}: names no model.path (the model the run started from), so the architecture "
                              f"of these weights is unknown; load a step that this project's trainer wrote")
    if base not in EMBEDDED_ALIASES and not os.path.exists(base):
        raise CheckpointError(f"{path}: a checkpoint of a run that started from {base!r}, which is not here (from "
                              f"{os.getcwd()}); run from the folder that run was started in, or put that model back")
    return base


def detect_format(path: str) -> str:
    if path in EMBEDDED_ALIASES:
        return "embedded"
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected a Hugging Face directory, a .gguf "
                                f"file, a softgrpo_jax orbax checkpoint, or 'smollm2' for the embedded default)")
    if _is_gguf(path):
        return "gguf"
    if os.path.isdir(path):
        if is_orbax_model(path):
            return "orbax"
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        if is_train_checkpoint(path):
            return "train"
    raise CheckpointError(f"{path}: not a Hugging Face directory (config.json + safetensors), a GGUF file, an "
                          f"orbax model checkpoint (softgrpo_model.json) or a training checkpoint "
                          f"(<output_dir>/checkpoints/<step>)")


def load_pretrained(path: str, *, dtype=None, compute_dtype=None, mesh=None, **overrides) -> Transformer:
    """Load a model from a Hugging Face directory, a llama.cpp ``.gguf`` file, an orbax checkpoint or one step of a
    training run (``<output_dir>/checkpoints/<step>``: the run's starting model with that step's weights).

    ``dtype`` is the parameter dtype (default float32), ``compute_dtype`` the activation dtype (default: ``dtype``;
    ``"auto"``: bfloat16 on accelerators and on CPUs with bf16 units, else float32: ``resolve_compute_dtype``),
    ``mesh`` places every weight on its sharding as it is read. Extra keyword arguments override ModelConfig fields
    (e.g. ``scan_layers=False``, ``remat=True``).
    """
    fmt = detect_format(path)
    kw = dict(dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, **overrides)
    if fmt == "hf":
        return load_hf(path, **kw)
    if fmt == "orbax":
        return load_orbax(path, **kw)
    if fmt == "train":  # the starting model's architecture (its weights are not read), the step's weights
        from softgrpo_jax.checkpoint.orbax_io import restore_model

        cfg = model_config(train_checkpoint_base(path), dtype=dtype, compute_dtype=compute_dtype, **overrides)
        return restore_model(cfg, os.path.join(path, "params"), mesh=mesh)
    if fmt == "gguf":
        from softgrpo_jax.checkpoint.gguf import load_gguf

        return load_gguf(path, **kw)
    from softgrpo_jax.checkpoint.embedded import smollm2_gguf_path
    from softgrpo_jax.checkpoint.gguf import load_gguf

    return load_gguf(smollm2_gguf_path(), **kw)


def model_config(path: str, *, dtype=None, compute_dtype=None, **overrides) -> ModelConfig:
    """The ModelConfig ``load_pretrained(path, ...)`` would build, read from the metadata alone (no weight is
    read): config.json, the GGUF header, softgrpo_model.json, or a kept step's starting model."""
    fmt = detect_format(path)
    kw = dict(dtype=dtype, compute_dtype=compute_dtype, **overrides)
    if fmt == "hf":
        return hf_model_config(path, **kw)
    if fmt == "orbax":
        from softgrpo_jax.checkpoint.orbax_io import orbax_model_config

        return orbax_model_config(path, **kw)
    if fmt == "train":
        return model_config(train_checkpoint_base(path), **kw)
    from softgrpo_jax.checkpoint.gguf import gguf_model_config

    if fmt == "gguf":
        return gguf_model_config(path, **kw)
    from softgrpo_jax.checkpoint.embedded import smollm2_gguf_path

    return gguf_model_config(smollm2_gguf_path(), **kw)


def load_tokenizer(path: str):
    """The tokenizer that goes with a model path (HF directory, GGUF file, orbax checkpoint with tokenizer files, or a
    run's kept step: its starting model's)."""
    fmt = detect_format(path)
    if fmt == "train":
        return load_tokenizer(train_checkpoint_base(path))
    if fmt == "embedded":
        from softgrpo_jax.checkpoint.embedded import smollm2_tokenizer

        return smollm2_tokenizer()  # cached as tokenizer files after the first build from the GGUF
    if fmt == "gguf":
        from softgrpo_jax.checkpoint.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if not any(f in found for f in TOKENIZER_VOCAB_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_VOCAB_FILES)}); copy "
                              f"the tokenizer files of the original model into this folder")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for broken tokenizer files
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: the tokenizer files cannot be loaded ({type(e).__name__}: {msg}); copy "
                              f"the tokenizer files of the original model into this folder") from e


# files a Hugging Face tokenizer is built from: at least one of the vocabulary files must be there (transformers
# otherwise builds a tokenizer of nothing but special tokens from tokenizer_config.json, or none at all)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                         "sentencepiece.bpe.model", "tekken.json")
TOKENIZER_FILES = TOKENIZER_VOCAB_FILES + ("tokenizer_config.json", "special_tokens_map.json", "merges.txt")


def save_pretrained(model: Transformer, path: str, *, tokenizer=None, format: str = "hf", overwrite: bool = False,
                    **kw) -> str:
    """Write ``model`` as a Hugging Face directory (``format="hf"``) or an orbax checkpoint (``"orbax"``).

    Writes go to a temporary directory renamed into place, so a failure never leaves a half-written checkpoint.
    An existing ``path`` is replaced only when it is an earlier export of this project holding nothing else (its
    ``softgrpo_export.json`` lists what it wrote) or an empty folder; anything else (a folder with other files, a
    plain file) is refused with a CheckpointError unless ``overwrite=True``.
    """
    if format == "hf":
        return save_hf(model, path, tokenizer=tokenizer, overwrite=overwrite, **kw)
    if format == "orbax":
        if kw:
            raise TypeError(f"save_pretrained(format='orbax') takes no {sorted(kw)}")
        return save_orbax(model, path, tokenizer=tokenizer, overwrite=overwrite)
    raise CheckpointError(f"unknown checkpoint format {format!r}; use 'hf' or 'orbax' (GGUF is import-only)")
