"""Checkpoint directories as read-one-tensor-at-a-time sources, named by Hugging Face names.

``open_checkpoint(path)`` accepts

- a Hugging Face directory: ``config.json`` and either ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json`` (pickled ``.bin`` weights are refused: unpickling runs code);
- an Orbax parameter checkpoint written by ``cpift_jax.training.checkpoints.save_params`` (detected by its
  ``_CHECKPOINT_METADATA`` / ``_METADATA`` file). Its leaf paths are mapped to Hugging Face
  names with ``cpift_jax.models.hf.hf_name`` (``model/layers/0/mlp/up_proj/kernel`` ->
  ``model.layers.0.mlp.up_proj.weight``, kernels transposed); a flat dict whose keys already
  are Hugging Face names maps to itself. Each tensor is restored on its own (Orbax partial
  restore), so Orbax inputs stream too. It has no config.json.

Every source gives ``specs`` (name -> ``TensorSpec`` in storage order, the order that reads
the files front to back) and ``read(name, buffer=None)`` (a numpy array; Hugging Face sources
read into ``buffer`` when given one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable

import jax
import numpy as np

from cpift_jax.models import safetensors_io as st

__all__ = ["Checkpoint", "HFCheckpoint", "OrbaxCheckpoint", "open_checkpoint", "copy_side_files",
           "TOKENIZER_FILES"]

_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Copied next to the merged weights: what AutoTokenizer and generate() read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class Checkpoint:
    """A source of named tensors; subclasses fill ``specs`` and implement ``read``."""

    kind = "?"
    reads_into_buffer = False  # whether read() uses its buffer argument

    def __init__(self, path: str):
        self.path = path
        self.specs: dict[str, st.TensorSpec] = {}
        self.config: dict | None = None

    def read(self, name: str, buffer: np.ndarray | None = None) -> np.ndarray:
        """The tensor ``name``; sources that can read in place put it into the first bytes of
        ``buffer`` (a uint8 array, see ``safetensors_io.Reader.read``), others ignore it."""
        raise NotImplementedError

    def will_need(self, name: str) -> None:
        """Hint that ``name`` is read soon (sources that can start reading ahead do)."""

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class HFCheckpoint(Checkpoint):
    kind = "hf"
    reads_into_buffer = True

    def __init__(self, path: str):
        super().__init__(path)
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                self.config = json.load(f)
        self._locations = _hf_locations(path)
        self.specs = {name: loc.spec for name, loc in self._locations.items()}
        self._reader = st.Reader()

    def read(self, name: str, buffer: np.ndarray | None = None) -> np.ndarray:
        return self._reader.read(self._locations[name], buffer)

    def will_need(self, name: str) -> None:
        self._reader.will_need(self._locations[name])

    def close(self) -> None:
        self._reader.close()


def _hf_locations(path: str) -> dict[str, st.TensorLocation]:
    index_file = os.path.join(path, st.INDEX_FILE)
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file} has no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        headers = {}
        for file in files:
            full = os.path.join(path, file)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"shard '{file}' listed in {index_file} does not exist")
            headers[file] = st.read_header(full)[0]
        for file in files:
            unlisted = sorted(set(headers[file]) - {n for n, f in weight_map.items() if f == file})
            if unlisted:
                # transformers reads only what the index lists; say so rather than drop silently.
                logging.warning("%s: %d tensors in %s are not in the index and are ignored, "
                                "first '%s'", path, len(unlisted), file, unlisted[0])
        locations = {}
        for file in files:  # shard order, then offset order: the files are read front to back
            for name, loc in headers[file].items():
                if weight_map.get(name) == file:
                    locations[name] = loc
        for name, file in weight_map.items():
            if name not in locations:
                raise ValueError(f"{path}: tensor '{name}' is listed in {st.INDEX_FILE} but "
                                 f"missing from '{file}'")
        return locations
    single = os.path.join(path, st.SINGLE_FILE)
    if os.path.isfile(single):
        return st.read_header(single)[0]
    present = sorted(os.listdir(path))
    pickles = [f for f in present if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{path} holds only pickled weights ({', '.join(pickles)}); refusing to unpickle "
            "(it can run arbitrary code). Convert it to safetensors first in a trusted "
            "environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)"
        )
    others = [f for f in present if f.endswith(".safetensors")]
    if others:
        raise ValueError(f"{path} has safetensors files ({', '.join(others[:3])}) but neither "
                         f"{st.SINGLE_FILE} nor {st.INDEX_FILE} saying which hold the model")
    raise FileNotFoundError(f"no {st.SINGLE_FILE} or {st.INDEX_FILE} in {path!r}")


class OrbaxCheckpoint(Checkpoint):
    kind = "orbax"

    def __init__(self, path: str):
        super().__init__(path)
        import orbax.checkpoint as ocp

        from cpift_jax import tree as tree_lib
        from cpift_jax.models.hf import hf_name

        self._ocp = ocp
        meta = ocp.StandardCheckpointer().metadata(os.path.abspath(path))
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        self._leaves: dict[str, tuple[tuple[str, ...], bool]] = {}
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaf_path = tree_lib.path_str(keypath)
            if not all(isinstance(k, jax.tree_util.DictKey) for k in keypath):
                raise ValueError(f"{path}: leaf '{leaf_path}' is not inside nested dicts; only "
                                 "dict-of-dicts Orbax checkpoints (nnx.to_pure_dict) are read")
            name, transposed = hf_name(leaf_path)
            if name in self._leaves:
                raise ValueError(f"{path}: leaves '{leaf_path}' and another both map to the "
                                 f"Hugging Face name '{name}'")
            shape = tuple(leaf.shape)
            spec = st.TensorSpec(name, np.dtype(leaf.dtype), shape[::-1] if transposed else shape)
            self.specs[name] = spec
            self._leaves[name] = (tuple(k.key for k in keypath), transposed)

    def read(self, name: str, buffer: np.ndarray | None = None) -> np.ndarray:
        del buffer  # Orbax restores into arrays of its own
        keys, transposed = self._leaves[name]
        item, args = 0, self._ocp.RestoreArgs(restore_type=np.ndarray)
        for key in reversed(keys):
            item, args = {key: item}, {key: args}
        restored = self._ocp.PyTreeCheckpointer().restore(
            os.path.abspath(self.path),
            args=self._ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
        )
        for key in keys:
            restored = restored[key]
        array = np.asarray(restored)
        return np.ascontiguousarray(array.T) if transposed else array


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The Hugging Face or Orbax checkpoint at ``path`` (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if any(os.path.isfile(os.path.join(path, m)) for m in _ORBAX_MARKERS):
        return OrbaxCheckpoint(path)
    return HFCheckpoint(path)


def copy_side_files(source_dir: str, target_dir: str, names: Iterable[str] = TOKENIZER_FILES):
    """Copies those of ``names`` that exist in ``source_dir``; returns the names copied."""
    copied = []
    for name in names:
        src = os.path.join(source_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(target_dir, name))
            copied.append(name)
    return copied
