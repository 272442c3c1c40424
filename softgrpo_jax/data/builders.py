"""tensorflow-datasets builders for the math data, written as array_record and read with ``as_data_source``.

No TensorFlow is needed: array_record files are written by TFDS's own writer and read back as a random-access
``DataSource`` of dicts (strings come back as ``bytes``; :func:`load_split` decodes them).

Builders (each a ``tfds.core.GeneratorBasedBuilder``; examples ``{"id", "question", "answer", "source"}``):

=====================  ========  ===========================================================================
name                   splits    what
=====================  ========  ===========================================================================
``deepscaler``         train     DeepScaleR-Preview (the seed's training set), user-supplied
``math500``            test      MATH-500, user-supplied
``aime24``/``aime25``  test      AIME 2024 / 2025, user-supplied
``amc23``              test      AMC 2023, user-supplied (the seed's verl ``amc.parquet`` holds AMC 22+23, 83 rows)
``gsm8k``              test      GSM8K test, user-supplied (answer = the number after ``####``)
``reasoning_gym_math`` train,    generated offline by reasoning-gym from a seed (no files needed)
                       test
=====================  ========  ===========================================================================

User files go in the TFDS *manual dir* (default ``<data_dir>/downloads/manual``), either at its top level under a
builder-specific name (``math500.parquet``, ``aime24.jsonl``, ``train.parquet`` is *not* accepted there) or in a
sub-folder named after the builder, where any ``<split>*.parquet|jsonl|json`` also matches (so a Hugging Face snapshot
such as ``gsm8k/test-00000-of-00001.parquet`` works as is).  See :data:`FILE_STEMS`.

The builders are not added to TFDS's global registry (TFDS ships its own, different ``gsm8k``); get them with
:func:`get_builder`.  Their default data dir is ``$SOFTGRPO_DATA_DIR``, else ``<TFDS data dir>/softgrpo_jax``.
The prepared data records the source file's SHA-256: :func:`load_split` rebuilds when the file changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile

import tensorflow_datasets as tfds

from softgrpo_jax.data import files as _files
from softgrpo_jax.data import reasoning_gym_data as _rg

log = logging.getLogger(__name__)

VERSION = "1.0.0"

# builder -> split -> file stems accepted at the top level of the manual dir (first match wins)
FILE_STEMS: dict[str, dict[str, tuple[str, ...]]] = {
    "deepscaler": {"train": ("deepscaler", "deepscaler_train", "deepscaler-preview", "DeepScaleR-Preview-Dataset")},
    "math500": {"test": ("math500", "math_500", "MATH-500", "math500_test", "math")},
    "aime24": {"test": ("aime24", "aime2024", "aime_2024", "AIME2024", "aime")},
    "aime25": {"test": ("aime25", "aime2025", "aime_2025", "AIME2025")},
    "amc23": {"test": ("amc23", "amc2023", "amc_2023", "AMC23", "amc")},
    "gsm8k": {"test": ("gsm8k", "gsm8k_test", "GSM8K")},
}
FILE_BENCHMARKS = tuple(FILE_STEMS)
BUILDERS = FILE_BENCHMARKS + ("reasoning_gym_math",)

_FEATURES = ("id", "question", "answer", "source")


def default_data_dir() -> str:
    env = os.environ.get("SOFTGRPO_DATA_DIR")
    if env:
        return os.path.expanduser(env)
    base = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    return os.path.join(os.path.expanduser(base), "softgrpo_jax")


def default_manual_dir(data_dir: str | None = None) -> str:
    return os.path.join(data_dir or default_data_dir(), "downloads", "manual")


def candidate_files(name: str, split: str, manual_dir: str) -> list[str]:
    """Paths that would be accepted for (builder, split), in priority order (existing or not)."""
    out = []
    sub = os.path.join(manual_dir, name)
    for stem in FILE_STEMS[name][split] + (split,):
        for ext in _files.EXTENSIONS:
            out.append(os.path.join(sub, stem + ext))
    for stem in FILE_STEMS[name][split]:
        for ext in _files.EXTENSIONS:
            out.append(os.path.join(manual_dir, stem + ext))
    return out


def find_file(name: str, split: str, manual_dir: str) -> str:
    """The user file for (builder, split) in ``manual_dir``; FileNotFoundError saying what to put where."""
    for p in candidate_files(name, split, manual_dir):
        if os.path.isfile(p):
            return p
    sub = os.path.join(manual_dir, name)
    if os.path.isdir(sub):  # Hugging Face shard names: <split>-00000-of-00001.parquet, <split>.jsonl.json...
        for fn in sorted(os.listdir(sub)):
            if fn.startswith(split) and fn.lower().endswith(_files.EXTENSIONS):
                return os.path.join(sub, fn)
    names = ", ".join(s + ".{parquet,jsonl,json}" for s in FILE_STEMS[name][split])
    raise FileNotFoundError(
        f"{name}: no {split!r} data file found. Put one of [{names}] in {manual_dir}, or any "
        f"{split}*.parquet|jsonl|json in {sub}/ (rows with problem/question + answer, a verl parquet with "
        f"prompt + reward_model.ground_truth, or the Soft-Thinking json with prompt + final_answer). "
        f"Pass manual_dir=... (or --manual_dir) to read them from elsewhere.")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _features():
    return tfds.features.FeaturesDict({k: tfds.features.Text() for k in _FEATURES})


class _NoCodePath:
    """TFDS resolves a builder's source file for its checksums.tsv through ``importlib_resources``, a package that
    is not installed on Python >= 3.9 here; these builders download nothing, so they have no checksums file."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # noqa: D102
        return None


class _MathFileBuilder(_NoCodePath, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common part of the user-file builders: one split per entry of FILE_STEMS[name]."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "First release: uniform {id, question, answer, source} examples."}

    def _info(self):
        return self.dataset_info_from_configs(features=_features(), disable_shuffling=True,
                                              metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        manual_dir = str(getattr(dl_manager, "_manual_dir", None) or default_manual_dir(str(self._data_dir_root)))
        gens, meta = {}, {"source_files": {}, "skipped": {}, "skipped_reasons": {}}
        for split in FILE_STEMS[self.name]:
            path = find_file(self.name, split, manual_dir)
            res = _files.read_examples(path, self.name)
            if res.skipped:
                log.warning("%s/%s: skipped %d malformed rows of %s (first: %s)", self.name, split, res.skipped,
                            path, res.reasons[:3])
            if not res.examples and not res.skipped:
                raise _files.DataFileError(f"{path}: the file holds no rows; put the {split} problems in it (rows "
                                           f"with problem/question + answer), or remove it")
            if not res.examples:
                raise _files.DataFileError(f"{path}: no usable rows ({res.skipped} malformed; first reasons: "
                                           f"{'; '.join(res.reasons[:3])}); rows need a problem/question and an "
                                           f"answer")
            meta["source_files"][split] = {"path": os.path.abspath(path), "sha256": _sha256(path)}
            meta["skipped"][split] = res.skipped
            meta["skipped_reasons"][split] = res.reasons
            gens[split] = self._generate_examples(res.examples)
        self.info.metadata.update(meta)
        return gens

    def _generate_examples(self, examples):
        for i, ex in enumerate(examples):
            yield i, ex


class Deepscaler(_MathFileBuilder, skip_registration=True):
    """DeepScaleR-Preview training problems (the seed's ``datasets/train.parquet``)."""

    name = "deepscaler"


class Math500(_MathFileBuilder, skip_registration=True):
    name = "math500"


class Aime24(_MathFileBuilder, skip_registration=True):
    name = "aime24"


class Aime25(_MathFileBuilder, skip_registration=True):
    name = "aime25"


class Amc23(_MathFileBuilder, skip_registration=True):
    name = "amc23"


class Gsm8k(_MathFileBuilder, skip_registration=True):
    name = "gsm8k"


@dataclasses.dataclass(eq=False, repr=False)
class ReasoningGymConfig(tfds.core.BuilderConfig):
    """Task mix and sizes of the generated default.  ``tasks``: (task, weight, ((key, value), ...)) tuples."""

    tasks: tuple = _rg.DEFAULT_TASKS
    train_size: int = 8192
    test_size: int = 512
    seed: int = 1234

    def __repr__(self) -> str:
        return f"ReasoningGymConfig(name={self.name!r}, {json.dumps(self.params())})"

    def params(self) -> dict:
        return {"tasks": [[t[0], float(t[1]), [list(kv) for kv in (t[2] if len(t) > 2 else ())]] for t in self.tasks],
                "train_size": self.train_size, "test_size": self.test_size, "seed": self.seed}


def reasoning_gym_config(*, tasks=None, train_size: int = 8192, test_size: int = 512, seed: int = 1234,
                         name: str | None = None) -> ReasoningGymConfig:
    """A config for :class:`ReasoningGymMath`; its name (and so its directory) is derived from the parameters."""
    norm = []
    for t in (tasks if tasks is not None else _rg.DEFAULT_TASKS):
        if isinstance(t, str):
            t = (t, 1.0, ())
        cfg = t[2] if len(t) > 2 and t[2] else ()
        cfg = tuple(sorted(cfg.items())) if isinstance(cfg, dict) else tuple(tuple(kv) for kv in cfg)
        norm.append((str(t[0]), float(t[1]), cfg))
    cfg = ReasoningGymConfig(name="tmp", tasks=tuple(norm), train_size=int(train_size), test_size=int(test_size),
                             seed=int(seed))
    if name is None:
        digest = hashlib.sha1(json.dumps(cfg.params(), sort_keys=True).encode()).hexdigest()[:10]
        name = "default" if cfg.params() == ReasoningGymConfig(name="default").params() else f"custom_{digest}"
    cfg.name = name
    cfg.description = f"reasoning-gym math: {json.dumps(cfg.params())}"
    return cfg


class ReasoningGymMath(_NoCodePath, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The embedded default: reasoning-gym arithmetic problems, disjoint train/test splits (deduped by question)."""

    name = "reasoning_gym_math"
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "First release."}
    BUILDER_CONFIGS = [ReasoningGymConfig(name="default", description="default task mix, 8192 train / 512 test")]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self):
        return self.dataset_info_from_configs(features=_features(), disable_shuffling=True,
                                              metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        gen = _rg.generate(cfg.tasks, train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed)
        self.info.metadata.update({"params": cfg.params(), "skipped": gen.skipped, "duplicates": gen.duplicates,
                                   "shortfall": gen.shortfall})
        return {"train": self._generate_examples(gen.train), "test": self._generate_examples(gen.test)}

    def _generate_examples(self, examples):
        for i, ex in enumerate(examples):
            yield i, ex


for _c in (Deepscaler, Math500, Aime24, Aime25, Amc23, Gsm8k):
    _c.MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(
        f"{split}: one of " + ", ".join(s + ".{parquet,jsonl,json}" for s in stems) + f" (or <manual_dir>/{_c.name}/)"
        for split, stems in FILE_STEMS[_c.name].items())

_CLASSES = {c.name: c for c in (Deepscaler, Math500, Aime24, Aime25, Amc23, Gsm8k, ReasoningGymMath)}


def get_builder(name: str, *, data_dir: str | None = None, **config_kw) -> tfds.core.DatasetBuilder:
    """A builder instance (array_record format).  ``config_kw`` (reasoning_gym_math only): tasks, train_size,
    test_size, seed."""
    if name not in _CLASSES:
        from softgrpo_jax.config import ConfigError

        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(_CLASSES))}")
    kw = {"data_dir": data_dir or default_data_dir(), "file_format": "array_record"}
    if name == "reasoning_gym_math":
        kw["config"] = reasoning_gym_config(**config_kw)
    elif config_kw:
        raise TypeError(f"{name} takes no config arguments (got {sorted(config_kw)})")
    # TFDS makes an empty temporary folder (tempfile.mkdtemp("tfds"), DatasetInfo.initialize_from_bucket) for every
    # builder of a not-yet-prepared data set and never removes it: point it at a folder of ours and remove that.
    scratch = tempfile.mkdtemp(prefix="softgrpo-tfds-")
    saved = tempfile.tempdir
    tempfile.tempdir = scratch
    try:
        return _CLASSES[name](**kw)
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(scratch, ignore_errors=True)
