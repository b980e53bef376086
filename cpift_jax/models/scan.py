"""The decoder forward used for training: layers run by ``lax.scan`` over stacked weights,
rematerialisation per layer, and a compute dtype apart from the parameters' dtype.

Two layouts of one model's parameters. The *storage* layout (``model/layers/{i}/...`` with int
keys, as ``cpift_jax.models.llama`` documents) is what the rest of the library sees. The
*stacked* layout (``stack_layers``) has one dict ``model/layers/<leaf>`` of ``[num_layers, ...]``
arrays instead, so ``lax.scan`` traces (and XLA compiles) one layer whatever the depth, and a
train state in this layout (parameters, Adam moments, freeze mask) has as many leaves for 32
layers as for 2. ``training.step`` keeps its state stacked when ``scan_layers`` is on and
converts at the boundary of ``train()``: ``stack_layers`` / ``stack_freeze_arrays`` once on
entry, ``unstack_layers`` once on exit. ``stack_freeze_pattern`` maps a freeze pattern
(``optim.freeze_pattern``) to the stacked paths: a leaf whose layers all share one whole-leaf
setting keeps it, any other becomes element-wise.

Each layer is the ``DecoderLayer`` module of ``llama.py`` bound to its slice of the weights, so
the maths is the one of ``LlamaForCausalLM.hidden_states`` (without a KV cache), and
``hidden_states(..., scan=False, remat="none")`` gives the same values as that method. Layers
with different attention windows (Gemma-2's alternating local and global layers) share the one
traced layer: the scan carries each layer's window as data, a global layer's being the sequence
length (which masks nothing).

Packed rows (``cpift_jax.data.packing``): ``hidden_states(..., segment_ids=, positions=)``
restricts attention to the query's own document and takes the rotary angles from the
documents' own positions, so each document's hidden states are those it has alone. Without
them the traced program is the unpacked one, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpift_jax import tree as tree_lib
from cpift_jax.models.config import ModelConfig
from cpift_jax.models.layers import rope_cos_sin, scale_embedding
from cpift_jax.models.llama import LlamaForCausalLM

__all__ = ["REMAT_POLICIES", "stack_layers", "unstack_layers", "stack_freeze_pattern",
           "stack_freeze_arrays", "cast_floating", "hidden_states", "head_kernel"]

# remat name -> what jax.checkpoint saves of a layer's forward for the backward pass
# (None: no jax.checkpoint at all, every activation is kept).
REMAT_POLICIES = {
    "none": None,
    # Only the layer's input is saved; the backward recomputes the whole layer.
    "layer": jax.checkpoint_policies.nothing_saveable,
    # Matmul outputs without batch dimensions (the projections) are saved; attention scores,
    # norms and activations are recomputed.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(params: dict) -> dict:
    """``params`` with ``model/layers`` (``{0: layer, 1: layer, ...}``) replaced by one layer
    dict of ``[num_layers, ...]`` arrays (in index order)."""
    layers = params["model"]["layers"]
    ordered = [layers[i] for i in range(len(layers))]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
    return _with_layers(params, stacked)


def _with_layers(params: dict, layers) -> dict:
    return {**params, "model": {**params["model"], "layers": layers}}


def unstack_layers(params: dict) -> dict:
    """Inverse of ``stack_layers``: ``model/layers/<leaf>`` ``[num_layers, ...]`` back to
    ``{0: layer, 1: layer, ...}``."""
    stacked = params["model"]["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    layers = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
    return _with_layers(params, layers)


_LAYERS_PREFIX = "model/layers/"


def _per_layer_kinds(kinds: dict, rest: str, num_layers: int) -> list:
    paths = [f"{_LAYERS_PREFIX}{i}/{rest}" for i in range(num_layers)]
    missing = [p for p in paths if p not in kinds]
    if missing:
        raise ValueError(f"freeze pattern has no entry for '{missing[0]}'")
    return [kinds[p] for p in paths]


def _stacked_kind(per_layer: list):
    """One whole-leaf setting shared by every layer stays; anything else is element-wise."""
    first = per_layer[0]
    return first if first != "array" and all(k == first for k in per_layer) else "array"


def stack_freeze_pattern(pattern: tuple | None, stacked_params) -> tuple | None:
    """The freeze pattern of the stacked layout, in the flatten order of ``stacked_params``
    (stacked parameters or their abstract shapes), from the storage layout's ``pattern``."""
    if pattern is None:
        return None
    kinds = dict(pattern)
    num_layers = jax.tree.leaves(stacked_params["model"]["layers"])[0].shape[0]
    out = []
    for path in tree_lib.leaf_paths(stacked_params):
        if path.startswith(_LAYERS_PREFIX):
            rest = path[len(_LAYERS_PREFIX):]
            out.append((path, _stacked_kind(_per_layer_kinds(kinds, rest, num_layers))))
        elif path not in kinds:
            raise ValueError(f"freeze pattern has no entry for '{path}'")
        else:
            out.append((path, kinds[path]))
    return tuple(out)


def _get(tree, keypath):
    for key in keypath:
        tree = tree[key.key]
    return tree


def stack_freeze_arrays(pattern: tuple, arrays: dict, params: dict) -> dict:
    """The freeze mask's arrays (``optim.split_freeze_mask``: bool arrays, None at whole-leaf
    entries) in the stacked layout of ``stack_freeze_pattern(pattern, ...)``. A stacked leaf
    whose layers mix element-wise and whole-leaf settings gets ``True``/``False`` filled in
    for the whole-leaf layers. ``params`` (storage layout, arrays or abstract) gives shapes.
    Traceable."""
    kinds = dict(pattern)
    layer_params = params["model"]["layers"]
    num_layers = len(layer_params)
    mask_layers = arrays["model"]["layers"]

    def stack(keypath, leaf):
        per_layer = _per_layer_kinds(kinds, tree_lib.path_str(keypath), num_layers)
        if _stacked_kind(per_layer) != "array":
            return None
        return jnp.stack([
            _get(mask_layers[i], keypath) if kind == "array"
            else jnp.full(leaf.shape, bool(kind), jnp.bool_)
            for i, kind in enumerate(per_layer)
        ]).astype(jnp.bool_)

    stacked = jax.tree_util.tree_map_with_path(stack, layer_params[0])
    return _with_layers(arrays, stacked)


def cast_floating(tree, dtype):
    """Floating leaves of ``tree`` cast to ``dtype`` (other leaves and same-dtype leaves as is)."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(cast, tree)


@functools.lru_cache(maxsize=32)
def _modules(config: ModelConfig):
    """Graph definitions of the embedding, one decoder layer and the final norm, taken from an
    abstract ``LlamaForCausalLM`` of ``config`` (so their construction is the model's own).
    Every layer is built alike, so a one-layer model gives them at a cost independent of the
    depth."""
    one_layer = dataclasses.replace(config, num_hidden_layers=1,
                                    layer_types=config.layer_types and config.layer_types[:1])
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(one_layer, rngs=nnx.Rngs(0)))
    inner = abstract.model
    return tuple(nnx.split(module, nnx.Param)[0]
                 for module in (inner.embed_tokens, inner.layers[0], inner.norm))


def hidden_states(config: ModelConfig, params: dict, tokens: jax.Array, *, scan: bool = False,
                  remat: str = "none", compute_dtype: str | None = None,
                  activation_sharding=None, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states ``[batch, seq, hidden]`` (positions ``0..seq-1`` by default).

    Args:
      params: the storage layout, or with ``scan=True`` the ``stack_layers`` layout.
      scan: run the layers with ``lax.scan`` over the stacked weights (one traced layer).
      remat: a ``REMAT_POLICIES`` name; ``jax.checkpoint`` around each layer.
      compute_dtype: "float32" | "bfloat16": the modules compute in this dtype (None: the
        config's ``param_dtype``). ``params`` must already be in it (``cast_floating``); the
        norms' statistics and the attention softmax stay in float32 (``llama.py``).
      activation_sharding: a ``NamedSharding`` for the ``[batch, seq, hidden]`` activations
        (the batch's rows over the data axes), imposed after the embedding and after every
        layer. Without it the partitioner may follow the weights' fsdp split instead and keep
        every row's activations (attention scores included) on every device.
      segment_ids: int ``[batch, seq]``, packed rows: key ``k`` is visible to query ``q`` iff
        ``k <= q``, both are in one segment and (sliding-window layers) ``q - k < window``
        (``layers.segment_attention_mask``). None: plain causal attention (the unpacked code).
      positions: int ``[batch, seq]``, the rotary positions (packed rows: restarting at 0 in
        every document); None: ``0..seq-1``.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    if compute_dtype is not None and compute_dtype != config.param_dtype:
        config = dataclasses.replace(config, param_dtype=compute_dtype)
    embed_def, layer_def, norm_def = _modules(config)
    model = params["model"]
    batch, seq = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
    cos, sin = rope_cos_sin(config, positions)

    windows = config.layer_windows

    def constrain(h):
        if activation_sharding is None:
            return h
        return jax.lax.with_sharding_constraint(h, activation_sharding)

    def layer(h, layer_params, window):
        out, _ = nnx.merge(layer_def, layer_params)(h, cos, sin, None, None, window,
                                                    segment_ids)
        return constrain(out)

    def checkpointed(static_window: bool):
        if remat == "none":
            return layer
        # A window given as a Python value (or None) stays one inside the checkpoint.
        return jax.checkpoint(layer, policy=REMAT_POLICIES[remat],
                              static_argnums=(2,) if static_window else ())

    h = constrain(scale_embedding(config, nnx.merge(embed_def, model["embed_tokens"])(tokens)))
    if not scan:
        run = checkpointed(True)
        for i in range(config.num_hidden_layers):
            h = run(h, model["layers"][i], windows[i])
    elif len(set(windows)) == 1:
        run = checkpointed(True)
        h, _ = jax.lax.scan(lambda carry, lp: (run(carry, lp, windows[0]), None), h,
                            model["layers"])
    else:
        run = checkpointed(False)
        per_layer = np.asarray([seq if w is None else w for w in windows], np.int32)
        h, _ = jax.lax.scan(lambda carry, xs: (run(carry, *xs), None), h,
                            (model["layers"], per_layer))
    return nnx.merge(norm_def, model["norm"])(h)


def head_kernel(config: ModelConfig, params: dict) -> jax.Array:
    """The output projection ``[hidden, vocab]``: ``lm_head/kernel``, or the transposed token
    embedding when the embeddings are tied."""
    if config.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]
