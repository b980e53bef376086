"""Loading an HF checkpoint straight onto a mesh: each process reads only its devices' slices.

``hf.load(path, shardings=s)`` lands here. Every leaf becomes a global ``jax.Array`` from
``jax.make_array_from_callback(shape, sharding, callback)``; the callback gets the index (a tuple
of slices) of one addressable device's shard in *our* layout and reads just that block from the
safetensors file (``safe_open(...).get_slice(name)[...]``, which reads only the bytes it needs).
A kernel is stored transposed by HF (``[out, in]`` against our ``[in, out]``), so our index
``(rows, cols)`` is the HF index ``(cols, rows)`` and the block read is transposed back. So no
process ever holds a tensor it does not shard, and no host holds the whole model.

Blocks are cached per (leaf, index) while that leaf is built: a leaf replicated over some mesh
axes is read once per process, not once per device. The cache is dropped after each leaf.

Validation is the unsharded loader's (``hf.check_tensors``: missing, wrong-shaped or unexpected
tensors, from the files' headers only, before anything is read). A tied checkpoint that also
carries ``lm_head.weight`` has it compared with the embedding block by block as the embedding
is read (on a mismatch the process that sees it raises).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from cpift_jax import tree
from cpift_jax.models import hf
from cpift_jax.models.config import ModelConfig
from cpift_jax.models.functional import abstract_params

Index = tuple[slice, ...]
_EMBEDDING = "model/embed_tokens/embedding"


class SliceReader:
    """Blocks of HF tensors from open safetensors handles (``name -> file``, ``file -> handle``)."""

    def __init__(self, files: Mapping[str, str], handles: Mapping[str, object]):
        self.files, self.handles = files, handles

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file header (reads no data)."""
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str, index: Index) -> np.ndarray:
        """``tensor[index]`` in the HF layout, reading only that block."""
        return self.handles[self.files[name]].get_slice(name)[index]


def _normalise(index: Index, shape: tuple[int, ...]) -> Index:
    """Concrete ``slice(start, stop, step)`` per dimension (a hashable cache key)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _key(index: Index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def params_from_slices(config: ModelConfig, reader: SliceReader, shardings, *,
                       check_lm_head: bool, source: str) -> dict:
    """Our params as global ``jax.Array``s on ``shardings`` (a pytree of ``Sharding`` with the
    structure of ``abstract_params(config)``), each process reading only its shards.

    The tensors must already be validated (``hf.check_tensors``); ``check_lm_head`` compares
    ``lm_head.weight`` with the embedding block by block (a tied checkpoint that carries both).
    """
    abstract = abstract_params(config)
    paths = tree.leaf_paths(abstract)
    sharding_paths, sharding_leaves, _ = tree.flatten(shardings)
    by_path = dict(zip(sharding_paths, sharding_leaves))
    for path in sorted(set(paths) ^ set(by_path)):
        where = "shardings" if path in by_path else "the model's parameters"
        raise ValueError(f"{source}: leaf '{path}' is only in {where}; shardings must have the "
                         "structure of abstract_params(config)")
    for path, leaf in by_path.items():
        if not isinstance(leaf, jax.sharding.Sharding):
            raise TypeError(f"shardings leaf '{path}' is {type(leaf).__name__}, expected a "
                            "jax.sharding.Sharding")

    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    out = {}
    for path, leaf in zip(paths, jax.tree.leaves(abstract)):
        name, transposed = hf.hf_name(path)
        shape = tuple(leaf.shape)
        blocks: dict[tuple, np.ndarray] = {}  # this leaf's blocks read by this process

        def callback(index, name=name, transposed=transposed, shape=shape, blocks=blocks,
                     path=path):
            index = _normalise(index, shape)
            key = _key(index)
            if key not in blocks:
                hf_index = index[::-1] if transposed else index
                block = reader.read(name, hf_index)
                if check_lm_head and path == _EMBEDDING:
                    _check_tied_block(reader, hf_index, block, dtype, source)
                block = block.T if transposed else block
                blocks[key] = np.ascontiguousarray(block.astype(dtype, copy=False))
            return blocks[key]

        out[path] = jax.make_array_from_callback(shape, by_path[path], callback, dtype=dtype)
    return tree.map_with_path(lambda path, _: out[path], abstract)


def _check_tied_block(reader: SliceReader, index: Index, embed: np.ndarray, dtype,
                      source: str) -> None:
    head = reader.read("lm_head.weight", index).astype(dtype, copy=False)
    if not np.array_equal(head, embed.astype(dtype, copy=False)):
        raise ValueError(f"{source}: tie_word_embeddings is true but 'lm_head.weight' differs "
                         "from 'model.embed_tokens.weight' in block "
                         f"[{', '.join(f'{s.start}:{s.stop}' for s in index)}]")
