"""Hugging Face checkpoint import/export (config.json + safetensors; never pickle).

The mapping between our parameter paths and HF tensor names is a rename plus transposes:
``model/layers/0/mlp/up_proj/kernel`` <-> ``model.layers.0.mlp.up_proj.weight`` (kernel is the
transposed ``[in, out]`` weight), ``.../embedding`` <-> ``...weight``, norms and biases as they are.

    config, params = hf.load("path/to/checkpoint")      # config.json + (sharded) safetensors
    hf.save("out/dir", config, params)                   # AutoModelForCausalLM can load it

``load(path, shardings=s)`` (``s``: a pytree of ``jax.sharding.Sharding`` shaped like the params,
e.g. ``sharding.shardings(models.abstract_params(load_config(path)), mesh, mesh_config)``) builds
every leaf as a global ``jax.Array`` on its sharding, each process reading only the blocks its
devices hold (``hf_sharded``); without it every tensor is read whole onto the default device.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from safetensors import safe_open

from cpift_jax import tree
from cpift_jax.models import safetensors_io as st
from cpift_jax.models.config import ModelConfig
from cpift_jax.models.functional import abstract_params

SINGLE_FILE = st.SINGLE_FILE
INDEX_FILE = st.INDEX_FILE
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# Tensors some HF checkpoints carry that the model recomputes (old Llama RoPE buffers).
_DERIVED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def hf_name(path: str) -> tuple[str, bool]:
    """Our leaf path -> (HF tensor name, whether the array is stored transposed)."""
    parts = path.split("/")
    leaf = parts[-1]
    if leaf == "kernel":
        return ".".join(parts[:-1] + ["weight"]), True
    if leaf == "embedding":
        return ".".join(parts[:-1] + ["weight"]), False
    return ".".join(parts), False


def _expected(config: ModelConfig) -> list[tuple[str, str, bool, tuple[int, ...]]]:
    """(our path, HF name, transposed, HF shape) for every parameter of ``config``."""
    paths, leaves, _ = tree.flatten(abstract_params(config))
    rows = []
    for path, leaf in zip(paths, leaves):
        name, transposed = hf_name(path)
        shape = tuple(leaf.shape[::-1]) if transposed else tuple(leaf.shape)
        rows.append((path, name, transposed, shape))
    return rows


def params_from_tensors(
    config: ModelConfig, get_tensor: Callable[[str], np.ndarray], names: set[str], *, source: str
) -> dict:
    """Builds our params from HF-named tensors, one at a time.

    ``get_tensor(name)`` returns one HF tensor; ``names`` are all tensor names available. Raises
    ``ValueError`` for a missing tensor, a wrong shape or an unexpected extra tensor (naming it
    and ``source``). A tied checkpoint may also carry ``lm_head.weight``, which must then equal
    the embedding.
    """
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    by_path = {}
    for path, name, transposed, shape in _expected(config):
        if name not in names:
            raise ValueError(f"{source}: missing tensor '{name}' (expected shape {shape})")
        array = get_tensor(name)
        if tuple(array.shape) != shape:
            raise ValueError(f"{source}: tensor '{name}' has shape {tuple(array.shape)}, "
                             f"expected {shape}")
        array = array.T if transposed else array
        by_path[path] = jax.numpy.asarray(np.ascontiguousarray(array).astype(dtype, copy=False))
    used = {name for _, name, _, _ in _expected(config)}
    for name in sorted(names - used):
        if _DERIVED_TENSORS.fullmatch(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            embed = by_path["model/embed_tokens/embedding"]
            if not np.array_equal(np.asarray(get_tensor(name)).astype(dtype), np.asarray(embed)):
                raise ValueError(f"{source}: tie_word_embeddings is true but 'lm_head.weight' "
                                 "differs from 'model.embed_tokens.weight'")
            continue
        raise ValueError(f"{source}: unexpected tensor '{name}' for a {config.model_type} model "
                         "with this config")
    return tree.map_with_path(lambda path, _: by_path[path], abstract_params(config))


def load_config(path: str | os.PathLike, *, param_dtype: str | None = None) -> ModelConfig:
    """The ``ModelConfig`` of an HF checkpoint directory (its ``config.json``), as ``load`` gives."""
    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
    with open(config_file) as f:
        return ModelConfig.from_hf(json.load(f), param_dtype=param_dtype)


def check_tensors(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], *, source: str,
                  files: Mapping[str, str] | None = None) -> bool:
    """Checks HF tensor names and shapes against ``config`` without reading any data.

    ``shapes``: every available tensor's shape (from the safetensors headers); ``files``, if
    given, names each tensor's file in the errors. Raises ``ValueError`` as
    ``params_from_tensors`` does. Returns whether a tied checkpoint also carries
    ``lm_head.weight``, whose values must then be compared with the embedding.
    """
    used = set()
    for _, name, _, shape in _expected(config):
        used.add(name)
        if name not in shapes:
            raise ValueError(f"{source}: missing tensor '{name}' (expected shape {shape})")
        if tuple(shapes[name]) != shape:
            where = f" in '{files[name]}'" if files else ""
            raise ValueError(f"{source}: tensor '{name}'{where} has shape "
                             f"{tuple(shapes[name])}, expected {shape}")
    check_lm_head = False
    for name in sorted(set(shapes) - used):
        if _DERIVED_TENSORS.fullmatch(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            embed_shape = (config.vocab_size, config.hidden_size)
            if tuple(shapes[name]) != embed_shape:
                raise ValueError(f"{source}: tensor '{name}' has shape {tuple(shapes[name])}, "
                                 f"expected {embed_shape} (tied to the embedding)")
            check_lm_head = True
            continue
        raise ValueError(f"{source}: unexpected tensor '{name}' for a {config.model_type} model "
                         "with this config")
    return check_lm_head


def load(path: str | os.PathLike, *, param_dtype: str | None = None,
         shardings=None) -> tuple[ModelConfig, dict]:
    """HF checkpoint directory -> ``(ModelConfig, params)``.

    Reads ``config.json`` and either ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``, tensor by tensor. ``param_dtype`` overrides the dtype
    (default: the checkpoint's, see ``ModelConfig.from_hf``). Pickled ``.bin`` weights are refused.

    ``shardings``: a pytree of ``jax.sharding.Sharding`` with the params' structure. Each leaf
    is then a global ``jax.Array`` on its sharding, and each process reads from the files only
    the blocks of its addressable devices (``hf_sharded``; names and shapes are checked from the
    headers first). ``None``: every tensor is read whole (one host, default device).
    """
    path = os.fspath(path)
    config = load_config(path, param_dtype=param_dtype)
    files = _weight_files(path)
    handles = {}
    try:
        for file in set(files.values()):
            handles[file] = safe_open(os.path.join(path, file), framework="numpy")
        names = set()
        for file, handle in handles.items():
            names |= set(handle.keys())
        absent = sorted(set(files) - names)
        if absent:
            raise ValueError(f"{path}: tensor '{absent[0]}' is listed in {INDEX_FILE} but missing "
                             f"from '{files[absent[0]]}'")
        if shardings is not None:
            from cpift_jax.models import hf_sharded  # imports this module for the name mapping

            reader = hf_sharded.SliceReader(files, handles)
            check_lm_head = check_tensors(
                config, {name: reader.shape(name) for name in files}, source=path, files=files)
            params = hf_sharded.params_from_slices(config, reader, shardings,
                                                   check_lm_head=check_lm_head, source=path)
        else:
            params = params_from_tensors(
                config, lambda name: handles[files[name]].get_tensor(name), set(files),
                source=path)
    finally:
        handles.clear()
    return config, params


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file name within ``path``."""
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_file} has no 'weight_map' dict")
        for file in set(weight_map.values()):
            if not os.path.isfile(os.path.join(path, file)):
                raise FileNotFoundError(f"shard '{file}' listed in {index_file} does not exist")
        return dict(weight_map)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="numpy") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    pickles = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{path} holds only pickled weights ({', '.join(pickles)}); refusing to unpickle "
            "(it can run arbitrary code). Convert the checkpoint to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)` in a trusted "
            "environment."
        )
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}")


def hf_tensors(config: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(HF name, numpy array in HF layout and config.param_dtype)`` one at a time."""
    tree.check_same_shapes(abstract_params(config), params, names=("model", "params"))
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    flat = dict(zip(*tree.flatten(params)[:2]))
    for path, name, transposed, _ in _expected(config):
        array = np.asarray(flat[path])
        array = array.T if transposed else array
        yield name, np.ascontiguousarray(array.astype(dtype, copy=False))


def save(
    path: str | os.PathLike,
    config: ModelConfig,
    params: dict,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping | None = None,
) -> None:
    """Writes ``config.json`` and safetensors weights that ``transformers`` loads.

    One ``model.safetensors`` when the weights fit in ``max_shard_bytes``, else shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Existing weight
    files of those names in ``path`` are replaced (stale shards would otherwise be picked up).
    Weights are stored in ``config.param_dtype``; ``extra_config`` keys are added to config.json.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):
        if old == INDEX_FILE or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", old):
            os.remove(os.path.join(path, old))
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    specs = [st.TensorSpec(name, dtype, shape) for _, name, _, shape in _expected(config)]
    writer = st.ShardedWriter(path, st.plan_shards(specs, max_shard_bytes))
    try:
        for name, array in hf_tensors(config, params):
            writer.write(name, array)
        writer.finish()
    finally:
        writer.close()
    hf_config = config.to_hf_dict()
    hf_config.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
