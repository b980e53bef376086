"""Operator demo: core masks, clustering, CPI fusion and freezing on a synthetic toy pytree.

Command (about 10 s on a 2-core CPU, most of it start-up and compilation):

    python -m experiments.demo --config=configs/demo.py

Expected: the two planted task pairs are recovered as two clusters at tau = 0.1, every task's
exclusive core entries are transplanted unchanged, and the frozen entries stay bit-identical
through AdamW steps with weight decay; the last lines read "PASS" three times and the binary
exits with status 0 (1 if a check fails). Variant ``configs/demo.py:large`` uses a
41M-parameter pytree (8 layers of 1024 x 1024 and a 32000 x 1024 embedding).
"""

import ml_collections

from cpift_jax import optim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Synthetic "model": a stack of square layers plus an embedding table.
    config.num_layers = 4
    config.width = 64
    config.vocab = 256
    # Tasks 0,1 share one planted core region, tasks 2,3 another.
    config.num_tasks = 4
    config.tasks_per_region = 2
    config.core_fraction = 0.01  # paper's p = 1%
    config.tau = 0.1  # paper's overlap threshold
    config.stage_order = "random"
    config.merge = "slerp"
    config.overlap = "max_delta"
    # The freezing check: a few AdamW steps on random gradients, with weight decay so that an
    # unfrozen entry would move even where its gradient were zero.
    config.optimizer = optim.default_config()
    config.optimizer.total_steps = 20
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 1e-2
    config.optimizer.weight_decay = 0.1
    if arg == "large":
        config.num_layers, config.width, config.vocab = 8, 1024, 32000
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of configs/demo.py; known: large")
    return config
