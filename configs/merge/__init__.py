"""Merge recipes for ``experiments/merge.py`` (one file per operator; keys shared here).

    python -m experiments.merge --config=configs/merge/ties.py:BASE,MODEL_A,MODEL_B \
        --config.output=out/merged

Keys (``base_config``):
  models          tuple of checkpoint directories (Hugging Face or Orbax), merged in order.
  base            the base checkpoint ('' for none); task-vector operators need one.
  operator        a name from ``cpift_jax.merges.available()``.
  params          the operator's hyperparameters (a ``None`` value means the operator's
                  default). A tuple value is a layer gradient (anchors spread over layers),
                  except ``weights`` (one per model).
  rules           ((regex, {hyperparameter: value}), ...): per-tensor overrides. The regex
                  fully matches the Hugging Face tensor name ("model.layers.3.self_attn.q_proj
                  .weight"); per hyperparameter the first matching rule that sets it wins.
  output          the directory to create (required; written atomically).
  overwrite       replace a non-empty ``output``.
  max_shard_size  "2GB" (10**9 bytes per GB, as Hugging Face counts; "MiB"/"GiB" also work).
  dtype           '' keeps the checkpoints' dtype (which must agree); 'bfloat16', 'float32',
                  ... casts every input to it and stores the output in it.
  truncate_vocab  on an embedding/head vocabulary mismatch keep the smallest vocabulary (with a
                  warning) instead of failing.
  execution       'auto', 'jit' or 'eager' (see ``cpift_jax.streaming.merge``).
  direct_write    write the shards around the page cache (O_DIRECT) where the filesystem
                  allows it: less CPU per byte written, and the inputs stay cached.
  progress        show a progress bar (tensors and bytes).

The ``:arg`` after the recipe file is a comma-separated list of checkpoint paths (see each
recipe for which one is the base).
"""

from __future__ import annotations

import ml_collections


def base_config(operator: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.models = ()
    config.base = ""
    config.operator = operator
    config.params = ml_collections.ConfigDict()
    config.rules = ()
    config.output = ""
    config.overwrite = False
    config.max_shard_size = "2GB"
    config.dtype = ""
    config.truncate_vocab = False
    config.execution = "auto"
    config.direct_write = True
    config.progress = True
    return config


def paths_from_arg(arg: str | None, *, minimum: int, usage: str) -> list[str]:
    """The comma-separated checkpoint paths of a recipe's ``:arg`` ([] when none given)."""
    if not arg:
        return []
    paths = [p.strip() for p in arg.split(",") if p.strip()]
    if len(paths) < minimum:
        raise ValueError(f"expected {usage}, got {arg!r}")
    return paths
