"""Math data: TFDS builders (user files or reasoning-gym), prompt templates, prompt-length filtering.

``load_split(name, split)`` is the plain entry point: it prepares the TFDS data set if needed (array_record, no
TensorFlow) and returns a list of ``{"id", "question", "answer", "source"}`` dicts.  tensorflow-datasets and
reasoning-gym are imported only when a data set is loaded, so the prompt helpers work without them.
"""

from __future__ import annotations

import logging
import os

from softgrpo_jax.data.prompts import (  # noqa: F401 - re-exported
    STYLES,
    SUFFIX,
    THINK_SYSTEM,
    PromptSet,
    build_prompt,
    prepare_prompts,
    prompt_opens_think,
    resolve_style,
    template_opens_think,
    tokenize_and_filter,
)

log = logging.getLogger(__name__)

BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "gsm8k")
DATASETS = ("deepscaler",) + BENCHMARKS + ("reasoning_gym_math",)
SPLITS = {"deepscaler": ("train",), "reasoning_gym_math": ("train", "test"), **{b: ("test",) for b in BENCHMARKS}}


class Examples(list):
    """A list of example dicts that also says where it came from and how many source rows were skipped."""

    name: str = ""
    split: str = ""
    skipped: int = 0
    source_file: str | None = None
    metadata: dict

    def __init__(self, items=(), *, name="", split="", skipped=0, source_file=None, metadata=None):
        super().__init__(items)
        self.name, self.split, self.skipped, self.source_file = name, split, skipped, source_file
        self.metadata = dict(metadata or {})


def _decode(v):
    return v.decode("utf-8") if isinstance(v, bytes) else v


def get_builder(name: str, *, data_dir: str | None = None, **config_kw):
    """The TFDS builder of ``name`` (see :mod:`softgrpo_jax.data.builders`)."""
    from softgrpo_jax.data import builders

    return builders.get_builder(name, data_dir=data_dir, **config_kw)


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None, rebuild: bool = False,
            **config_kw):
    """Prepare (generate the array_record files of) data set ``name`` if needed; returns the ready builder.

    For user-file data sets, the prepared copy is rebuilt when the source file found now differs (SHA-256) from the
    one it was built from, or when ``rebuild``."""
    import tensorflow_datasets as tfds

    from softgrpo_jax.data import builders

    builder = builders.get_builder(name, data_dir=data_dir, **config_kw)
    root = data_dir or builders.default_data_dir()
    mdir = os.path.expanduser(manual_dir) if manual_dir else builders.default_manual_dir(root)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    prepared = os.path.exists(os.path.join(str(builder.data_dir), "dataset_info.json"))
    if prepared and name in builders.FILE_STEMS and not rebuild:
        recorded = builder.info.metadata.get("source_files", {}) if builder.info.metadata is not None else {}
        for split, rec in recorded.items():
            try:
                current = builders.find_file(name, split, mdir)
            except FileNotFoundError:
                continue  # the source is gone: keep the prepared copy
            if builders._sha256(current) != rec.get("sha256"):
                log.info("%s/%s: source file %s changed since it was prepared; rebuilding", name, split, current)
                rebuild = True
    if prepared and rebuild:
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    if not prepared or rebuild:
        for split in builders.FILE_STEMS.get(name, {}):
            builders.find_file(name, split, mdir)  # a clear FileNotFoundError before TFDS starts
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=mdir,
                                                                                  download_mode=mode))
        builder = builders.get_builder(name, data_dir=data_dir, **config_kw)  # re-read the written info
    return builder


def _prepare_once(name: str, **kw):
    """:func:`prepare` in a multi-process run (``jax.distributed`` initialised; every process calls it, as it calls
    :func:`load_split`): process 0 prepares while the others wait, then they read its copy (a data folder they
    share) or prepare their own (a folder of their own), instead of every process writing the same folder at once.
    An error of process 0 ends every process, with its message."""
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return prepare(name, **kw)
    import numpy as np
    from jax.experimental import multihost_utils

    from softgrpo_jax.data.files import DataFileError
    from softgrpo_jax.distributed import is_main_process

    builder, err = None, None
    if is_main_process():
        try:
            builder = prepare(name, **kw)
        except Exception as e:  # noqa: BLE001 - told to the others below, then raised here
            err = e
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(err is not None)))
    if err is not None:
        raise err
    if failed:
        raise DataFileError(f"data set {name}: process 0 could not prepare it (its error says why); fix that and "
                            f"start the run again")
    if builder is not None:
        return builder
    return prepare(name, **{**kw, "rebuild": False})  # (process 0 rebuilt it already where asked)


def load_split(name: str, split: str, *, data_dir: str | None = None, manual_dir: str | None = None,
               rebuild: bool = False, **kw) -> Examples:
    """Examples of ``split`` of data set ``name`` as a list of ``{"id", "question", "answer", "source"}`` dicts,
    building the TFDS data set first if needed.  ``kw`` configures ``reasoning_gym_math`` (tasks, train_size,
    test_size, seed).  The result's ``.skipped`` is the number of malformed source rows skipped for this split."""
    from softgrpo_jax.config import ConfigError

    if name not in SPLITS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(SPLITS)}")
    if split not in SPLITS[name]:
        raise ConfigError(f"{name} has splits {', '.join(SPLITS[name])}, not {split!r}")
    builder = _prepare_once(name, data_dir=data_dir, manual_dir=manual_dir, rebuild=rebuild, **kw)
    source = builder.as_data_source(split)
    items = [{k: _decode(v) for k, v in source[i].items()} for i in range(len(source))]
    meta = dict(builder.info.metadata or {})
    skipped = meta.get("skipped", {})
    n_skipped = skipped.get(split, 0) if name != "reasoning_gym_math" else sum(skipped.values())
    src = meta.get("source_files", {}).get(split, {}).get("path")
    return Examples(items, name=name, split=split, skipped=int(n_skipped), source_file=src, metadata=meta)
