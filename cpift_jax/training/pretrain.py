"""The toy base model: a small Llama pretrained briefly on ``cpift_jax.data.corpus``, cached.

``cached_base(...)`` keeps one base per settings under ``$CPIFT_CACHE/toy_base/<key>``
(``cpift_jax.cache``). The key is the hash of ``settings``: the model and tokenizer, the tasks,
the pretraining config, the SHA-256 of the exact token rows it trains on (so a change to the
corpus text, its sampling or the tokenizer gives a new key) and the versions of this package and
of JAX (so a code or compiler upgrade never reuses a base trained by older code).

``pretrain_base(cache_dir, ...)`` trains once into one directory and stores ``base_params.npz``
(one array per leaf path, loaded with ``allow_pickle=False``) and ``base_meta.json`` (the
settings). A later call with the same settings loads the file; with different settings it raises
ValueError naming the differing keys rather than returning a model trained otherwise. Files are
written under temporary names and renamed, metadata last, so an interrupted run leaves no cache
that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import cpift_jax
from cpift_jax import cache as cache_lib
from cpift_jax import distributed, models
from cpift_jax import optim
from cpift_jax.training import train as train_lib
from cpift_jax import tree as tree_lib
from cpift_jax.training.checkpoints import config_diff, read_json, write_json
from cpift_jax.data import batching, corpus
from cpift_jax.data.tokenizer import Tokenizer

__all__ = ["default_config", "corpus_arrays", "settings", "cache_key", "cached_base",
           "pretrain_base", "save_npz", "load_npz"]

Pytree = Any
_PARAMS, _META = "base_params.npz", "base_meta.json"
_PRETRAIN_TIMEOUT_S = 3600.0  # the other processes wait this long for process 0's pretraining


def default_config() -> ml_collections.ConfigDict:
    """Pretraining settings for a 0.1-0.4 M parameter model (about a minute of CPU at 600
    steps x 32 rows x 96 tokens)."""
    c = ml_collections.ConfigDict()
    c.steps = 600
    c.batch_size = 32
    c.seq_len = 96
    c.seed = 0
    c.task_fraction = 0.3  # share of pretraining tokens that are easy task text
    c.optimizer = optim.default_config()
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.total_steps = c.get_ref("steps")
    c.optimizer.weight_decay = 0.01
    return c


def save_npz(path: str | os.PathLike, params: Pytree) -> None:
    """Leaf path -> array ``.npz``, written atomically (temporary name, then rename)."""
    path = Path(path)
    paths, leaves, _ = tree_lib.flatten(params)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{p: np.asarray(x) for p, x in zip(paths, leaves)})
    os.replace(tmp, path)


def load_npz(path: str | os.PathLike, like: Pytree) -> Pytree:
    """Arrays of ``path`` in the structure of ``like``; ValueError on a missing, extra or
    reshaped leaf (by path)."""
    paths, leaves, treedef = tree_lib.flatten(like)
    with np.load(path, allow_pickle=False) as data:
        stored = set(data.files)
        for p in sorted(stored ^ set(paths)):
            where = "file" if p in stored else "model"
            raise ValueError(f"{path}: leaf '{p}' is only in the {where}")
        out = []
        for p, leaf in zip(paths, leaves):
            arr = data[p]
            if arr.shape != tuple(leaf.shape):
                raise ValueError(f"{path}: leaf '{p}' has shape {arr.shape}, expected {leaf.shape}")
            out.append(arr.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def corpus_arrays(tokenizer: Tokenizer, suite_config, config) -> dict[str, np.ndarray]:
    """The pretraining rows (``corpus.pretrain_arrays`` with ``config``'s length, seed and task
    share)."""
    return corpus.pretrain_arrays(tokenizer, config.seq_len, suite_config=suite_config,
                                  seed=config.seed, task_fraction=config.task_fraction)


def _sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def settings(model_config, tokenizer, suite_config, config, arrays) -> dict:
    """Everything that shapes the base's weights, as JSON: model, tokenizer, tasks, pretraining
    config, ``corpus_sha256`` of ``arrays`` (the rows it trains on) and the package and JAX
    versions."""
    meta = {
        "model": dataclasses.asdict(model_config),
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size},
        "tasks": list(suite_config.tasks),
        "pretrain": config.to_dict(),
        "corpus_sha256": _sha256(arrays),
        "versions": {"cpift_jax": cpift_jax.__version__, "jax": jax.__version__},
    }
    return json.loads(json.dumps(meta, default=str))


def cache_key(meta: dict) -> str:
    """The cache directory name of a base with these ``settings``: a hash of all of them."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def cached_base(model_config: models.ModelConfig, tokenizer: Tokenizer, suite_config,
                config=None, *, progress: bool = True) -> Pytree:
    """``pretrain_base`` in ``$CPIFT_CACHE/toy_base/<cache_key>`` (module docstring)."""
    config = default_config() if config is None else config
    arrays = corpus_arrays(tokenizer, suite_config, config)
    meta = settings(model_config, tokenizer, suite_config, config, arrays)
    cache = cache_lib.cache_dir("toy_base") / cache_key(meta)
    return _load_or_train(cache, model_config, config, arrays, meta, progress)


def pretrain_base(
    cache_dir: str | os.PathLike,
    model_config: models.ModelConfig,
    tokenizer: Tokenizer,
    suite_config,
    config=None,
    *,
    progress: bool = True,
) -> Pytree:
    """The pretrained base parameters, trained now or loaded from ``cache_dir`` (module doc).

    Training: ``init_params(model_config, config.seed)``, then ``config.steps`` AdamW steps on
    ``corpus.pretrain_arrays`` rows (LM loss on every token); the loss curve goes to
    ``cache_dir/base_metrics.jsonl``.
    """
    config = default_config() if config is None else config
    arrays = corpus_arrays(tokenizer, suite_config, config)
    meta = settings(model_config, tokenizer, suite_config, config, arrays)
    return _load_or_train(Path(cache_dir), model_config, config, arrays, meta, progress)


def _load_or_train(cache: Path, model_config, config, arrays, meta: dict, progress: bool):
    """Loads the base from ``cache`` or trains and stores it there. With several processes,
    process 0 trains (on its first device) and writes while the others wait at a barrier, then
    every process loads the same file."""
    like = models.abstract_params(model_config)
    cached = (cache / _META).exists()
    distributed.barrier(f"toy_base:{cache.name}:checked")  # nobody writes before all have looked
    if cached:
        differing = config_diff(read_json(cache / _META), meta)
        if differing:
            raise ValueError(
                f"{cache / _META} was made with different settings ({', '.join(differing)}); "
                "use another cache directory or the original settings"
            )
        logging.info("loading the cached base model from %s", cache / _PARAMS)
        return load_npz(cache / _PARAMS, like)

    if distributed.is_primary():
        cache.mkdir(parents=True, exist_ok=True)
        params = models.init_params(model_config, config.seed)
        params, _ = train_lib.train(  # mesh=None: this process's first device
            model_config, params, config.optimizer,
            batching.batches(arrays, config.batch_size, config.seed),
            steps=config.steps, metrics_path=cache / "base_metrics.jsonl", progress=progress,
            description="pretrain",
        )
        save_npz(cache / _PARAMS, params)
        write_json(cache / _META, meta)
    distributed.barrier(f"toy_base:{cache.name}:written", timeout_s=_PRETRAIN_TIMEOUT_S)
    return load_npz(cache / _PARAMS, like)
