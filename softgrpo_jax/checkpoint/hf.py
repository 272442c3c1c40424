"""Hugging Face checkpoints <-> NNX params: the weight-name map, a streaming loader and an atomic writer."""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from softgrpo_jax.checkpoint import safetensors_io as st
from softgrpo_jax.checkpoint.atomic import atomic_dir, check_destination  # noqa: F401 - re-exported
from softgrpo_jax.checkpoint.errors import CheckpointError
from softgrpo_jax.distributed import fit_spec
from softgrpo_jax.models.config import ModelConfig, UnsupportedModelError, resolve_compute_dtype
from softgrpo_jax.models.transformer import PARAM_SPECS, Transformer, param_shapes


# HF tensor name -> (our leaf name, transpose?). Layer tensors carry the layer index.
_GLOBAL = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}
_LAYER = {
    "input_layernorm.weight": ("attn_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.o_proj.bias": ("bo", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_INV_LAYER = {v[0]: (k, v[1]) for k, v in _LAYER.items()}
_INV_GLOBAL = {v[0]: (k, v[1]) for k, v in _GLOBAL.items()}
# tensors transformers writes that carry no weights of ours
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def hf_name_to_param(name: str) -> tuple[str, int | None, bool] | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ("wq", 3, transpose=True); unknown names -> None."""
    if name in _GLOBAL:
        leaf, tr = _GLOBAL[name]
        return leaf, None, tr
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        leaf, tr = _LAYER[m.group(2)]
        return leaf, int(m.group(1)), tr
    return None


def param_to_hf_name(leaf: str, layer: int | None) -> tuple[str, bool]:
    if layer is None:
        return _INV_GLOBAL[leaf]
    suffix, tr = _INV_LAYER[leaf]
    return f"model.layers.{layer}.{suffix}", tr


def read_json_object(path: str, what: str) -> dict:
    """A JSON file that must hold an object; CheckpointError naming the file when it does not."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text (byte {e.start}); re-download or re-export the "
                              f"model") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              f"re-download or re-export the model") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} holds a JSON {type(data).__name__}, expected an object; "
                              f"re-download or re-export the model")
    return data


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
    return read_json_object(cfg_path, "config.json")


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json_object(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no weight_map of tensor name -> file; re-download or re-export the "
                                  f"model")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{path}: the index names shard files that are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(f.endswith(".bin") for f in os.listdir(path)):
        raise CheckpointError(f"{path}: only PyTorch .bin weights found; re-save with safe_serialization=True")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_hf_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    for f in safetensors_files(path):
        yield from st.iter_tensors(f)


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, mesh=None,
             source: str = "checkpoint") -> Transformer:
    """Build a Transformer from (HF name, array) pairs, placing each finished weight on its sharding.

    Raises CheckpointError naming any missing, unexpected or mis-shaped tensor.
    """
    shapes = param_shapes(cfg)
    dt = cfg.jnp_param_dtype
    L = cfg.num_layers
    buffers: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {k: set() for k in shapes}
    placed: dict[str, jax.Array] = {}
    unexpected = []

    def place(leaf):
        arr = buffers.pop(leaf)
        if mesh is not None:
            sh = jax.sharding.NamedSharding(mesh, fit_spec(arr.shape, PARAM_SPECS[leaf], mesh))
            placed[leaf] = jax.device_put(arr, sh)
        else:
            placed[leaf] = jax.device_put(arr)

    for name, arr in tensors:
        m = hf_name_to_param(name)
        if m is None:
            if not _IGNORED.search(name):
                unexpected.append(name)
            continue
        leaf, layer, tr = m
        if leaf == "lm_head" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints still store the (identical) head
        if leaf not in shapes:
            unexpected.append(name)
            continue
        full = shapes[leaf]
        want = full[1:] if layer is not None else full
        if layer is not None and layer >= L:
            unexpected.append(name)
            continue
        a = np.asarray(arr)
        if tr:
            a = a.T
        if tuple(a.shape) != tuple(want):
            exp = tuple(reversed(want)) if tr else tuple(want)
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected {exp}")
        if leaf not in buffers:
            buffers[leaf] = np.empty(full, dtype=dt)
        if layer is None:
            buffers[leaf][...] = a
            filled[leaf].add(None)
        else:
            buffers[leaf][layer] = a
            filled[leaf].add(layer)
        need = set(range(L)) if len(full) and leaf in _INV_LAYER else {None}
        if filled[leaf] >= need:
            place(leaf)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors not used by a {cfg.family} model: {unexpected[:10]}"
                              + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = []
    for leaf in shapes:
        if leaf in placed:
            continue
        if leaf in _INV_LAYER:
            for i in range(L):
                if i not in filled[leaf]:
                    missing.append(param_to_hf_name(leaf, i)[0])
        else:
            missing.append(param_to_hf_name(leaf, None)[0])
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {missing[:10]}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    abs_model = nnx.eval_shape(lambda: Transformer(cfg, abstract=True))
    graphdef, state = nnx.split(abs_model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(placed[path[-1]])
    return nnx.merge(graphdef, state)


def hf_model_config(path: str, *, dtype=None, compute_dtype=None, **overrides) -> ModelConfig:
    """The ModelConfig ``load_hf`` builds for ``path``, from its config.json alone."""
    if dtype is not None:
        overrides["param_dtype"] = str(np.dtype(dtype))
    overrides.setdefault("dtype", resolve_compute_dtype(compute_dtype) if compute_dtype else overrides.get(
        "param_dtype", "float32"))
    return config_from_hf(read_hf_config(path), os.path.join(path, "config.json"), **overrides)


def load_hf(path: str, *, dtype=None, compute_dtype=None, mesh=None, **overrides) -> Transformer:
    cfg = hf_model_config(path, dtype=dtype, compute_dtype=compute_dtype, **overrides)
    return assemble(cfg, iter_hf_tensors(path), mesh=mesh, source=path)


def config_from_hf(hf: dict, where: str, **overrides) -> ModelConfig:
    """``ModelConfig.from_hf`` with the file named in its errors: UnsupportedModelError for an architecture this
    port does not implement, CheckpointError for a config.json that lacks a field or holds a wrong value."""
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{where}: {e}; this port implements the Qwen2 and Llama families") from None
    except KeyError as e:
        raise CheckpointError(f"{where}: the field {e.args[0]!r} is missing; re-download or re-export the "
                              f"model") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}; re-download or re-export the model") from None


def iter_model_tensors(model: Transformer, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, NumPy array) for every weight, in HF layout."""
    cfg = model.config
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        leaf = path[-1]
        arr = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            arr = arr.astype(dtype)
        if leaf in _INV_LAYER:
            for i in range(cfg.num_layers):
                name, tr = param_to_hf_name(leaf, i)
                yield name, (arr[i].T if tr else arr[i])
        else:
            name, tr = param_to_hf_name(leaf, None)
            yield name, (arr.T if tr else arr)


def save_hf(model: Transformer, path: str, *, tokenizer=None, max_shard_bytes: int = 5 * 2**30,
            dtype=None, overwrite: bool = False) -> str:
    """Write a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Atomic; an existing
    ``path`` that is not an earlier export is refused unless ``overwrite`` (see :mod:`.atomic`)."""
    cfg = model.config
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(cfg.param_dtype)
    hf = cfg.to_hf()
    hf["torch_dtype"] = hf["dtype"] = str(out_dtype) if out_dtype.name != "bfloat16" else "bfloat16"
    from softgrpo_jax import __version__

    with atomic_dir(path, overwrite=overwrite, manifest={"format": "hf", "version": __version__}) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in iter_model_tensors(model, out_dtype):
            if size and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = np.ascontiguousarray(arr)
            size += arr.nbytes
        if len(shards) == 1:
            st.write_file(os.path.join(tmp, "model.safetensors"), shards[0])
        else:
            weight_map, total = {}, 0
            n = len(shards)
            for i, sh in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                st.write_file(os.path.join(tmp, fname), sh)
                for k, v in sh.items():
                    weight_map[k] = fname
                    total += v.nbytes
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=1)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id) or None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path
