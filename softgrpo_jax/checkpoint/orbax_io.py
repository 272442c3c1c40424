"""The project's own model checkpoints: ``softgrpo_model.json`` (the ModelConfig) + an orbax PyTree of params."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from softgrpo_jax.checkpoint.atomic import atomic_dir
from softgrpo_jax.checkpoint.errors import CheckpointError
from softgrpo_jax.distributed import state_shardings
from softgrpo_jax.models.config import ModelConfig, resolve_compute_dtype
from softgrpo_jax.models.transformer import Transformer

MARKER = "softgrpo_model.json"


def is_orbax_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save_orbax(model: Transformer, path: str, *, tokenizer=None, overwrite: bool = False) -> str:
    """Write ``model`` (and ``tokenizer``'s files) as an orbax checkpoint folder. Atomic; an existing ``path`` that
    is not an earlier export is refused unless ``overwrite`` (see :mod:`.atomic`)."""
    import orbax.checkpoint as ocp

    from softgrpo_jax import __version__

    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with atomic_dir(path, overwrite=overwrite, manifest={"format": "orbax", "version": __version__}) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(os.path.abspath(tmp), "params"), state)
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(json.dumps({"format": "softgrpo_jax/orbax-v1",
                                "config": json.loads(model.config.to_json())}, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def restore_params_into(model: Transformer, params_dir: str, mesh=None) -> Transformer:
    """Restore an orbax params PyTree into ``model`` (shapes must match), placed on ``mesh`` if given. ``model``
    may be abstract (``nnx.eval_shape``): only its shapes and dtypes are read, so no weight is allocated twice."""
    import orbax.checkpoint as ocp

    params = nnx.state(model, nnx.Param)
    if mesh is not None:
        sh = state_shardings(params, mesh)
        abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                nnx.to_pure_dict(params), nnx.to_pure_dict(sh))
    else:
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(params))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.abspath(params_dir), abstract)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{params_dir}: orbax params do not match the model: {e}") from None
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(model, params)
    left = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model))
            if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if left:  # an abstract model's variables that are not parameters: nothing to restore them from
        raise CheckpointError(f"{params_dir}: no values for {left[:3]}")
    return model


def orbax_model_config(path: str, *, dtype=None, compute_dtype=None, **overrides) -> ModelConfig:
    """The ModelConfig ``load_orbax`` builds for ``path``: the saved config with the overrides."""
    from softgrpo_jax.checkpoint.hf import read_json_object

    where = os.path.join(path, MARKER)
    meta = read_json_object(where, MARKER)
    try:
        cfg = ModelConfig.from_json(json.dumps(meta["config"]))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: no usable model config ({type(e).__name__}: {e}); re-export the "
                              f"checkpoint") from None
    if dtype is not None:
        overrides["param_dtype"] = str(np.dtype(dtype))
    if compute_dtype is not None:
        overrides["dtype"] = resolve_compute_dtype(compute_dtype)
    return cfg.replace(**overrides)


def restore_model(cfg: ModelConfig, params_dir: str, mesh=None) -> Transformer:
    """A model of ``cfg`` with its weights read from an orbax params folder, each placed on its sharding as it is
    read (nothing is allocated before)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, abstract=True))
    return restore_params_into(model, params_dir, mesh=mesh)


def load_orbax(path: str, *, dtype=None, compute_dtype=None, mesh=None, **overrides) -> Transformer:
    cfg = orbax_model_config(path, dtype=dtype, compute_dtype=compute_dtype, **overrides)
    if not os.path.isdir(os.path.join(path, "params")):
        raise CheckpointError(f"{path}: the params folder is missing; re-export the checkpoint")
    return restore_model(cfg, os.path.join(path, "params"), mesh=mesh)
