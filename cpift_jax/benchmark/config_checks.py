"""The benchmark's method names, labels and budgets, and the checks of its config.

Split out of ``cpift_jax.benchmark.pipeline``: everything here reads the config only (see
``configs/toy.py`` for the fields); ``check_config`` fails before any work with a ValueError
naming the config key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpift_jax import clustering, fusion, merges
from cpift_jax.benchmark import real_tasks
from cpift_jax.benchmark import tasks as tasks_lib
from cpift_jax.data import suite as suite_lib

__all__ = ["MAIN_METHODS", "LABELS", "BACKBONES", "check_config", "learning_rate", "budgets",
           "optimizer_steps", "ablation_variants"]

MAIN_METHODS = ("single_task", "multitask_sft", "multitask_sft_equal_steps", "multistage_random",
                "multistage_heuristic", "fused_only", "cpift")
LABELS = {
    "single_task": "Single-task experts (reference)",
    "multitask_sft": "Full multi-task SFT (equal compute)",
    "multitask_sft_equal_steps": "Full multi-task SFT (equal steps)",
    "multistage_random": "Multi-stage SFT, random groups",
    "multistage_heuristic": "Multi-stage SFT, heuristic order (easiest first)",
    "fused_only": "CPI fusion only (no pipeline SFT)",
    "cpift": "CPI-FT",
}
BACKBONES = ("base", "multitask_sft")
MODEL_BACKENDS = ("toy", "smollm2", "hf")


# ------------------------------------------------------------------------------ config checks


def _fail(key: str, problem: str):
    raise ValueError(f"config '{key}' {problem}")


def check_config(config) -> None:
    """ValueError naming the first bad config key (see ``configs/toy.py`` for the fields)."""
    if tasks_lib.is_real(config):
        real_tasks.check_config(config)
    else:
        suite_lib.check_config(config.suite)
    names = tasks_lib.names(config)
    if config.model.backend not in MODEL_BACKENDS:
        _fail("model.backend", f"must be one of {MODEL_BACKENDS}, got {config.model.backend!r}")
    if config.model.backend == "toy" and tasks_lib.is_real(config):
        _fail("model.backend", "is 'toy' (a character-level model of the synthetic suite) but "
              "data.tasks names real datasets; use 'smollm2' or 'hf'")
    if config.model.backend == "hf" and not os.path.isdir(
            os.path.expanduser(config.model.get("hf_path", ""))):
        _fail("model.hf_path", f"must be a local Hugging Face checkpoint directory, got "
              f"{config.model.get('hf_path', '')!r}")
    if len(config.seeds) < 1:
        _fail("seeds", "is empty; give at least one seed")
    unknown = sorted(set(config.methods) - set(MAIN_METHODS))
    if unknown:
        _fail("methods", f"names unknown method(s) {unknown}; known: {', '.join(MAIN_METHODS)}")
    d = config.data
    if d.n_train < 1 or d.n_test < 1:
        _fail("data.n_train/n_test", f"must be >= 1 (empty dataset), got {d.n_train}/{d.n_test}")
    if d.n_train < config.train.batch_size:
        _fail("data.n_train", f"= {d.n_train} is smaller than one batch "
              f"(train.batch_size = {config.train.batch_size})")
    learning_rate(config)  # fails on a reference width without a toy model
    if config.train.steps_per_task < 1:
        _fail("train.steps_per_task", f"must be >= 1, got {config.train.steps_per_task}")
    _check_cpift(config.cpift, "cpift")
    if not 1 <= config.multistage.k <= len(names):
        _fail("multistage.k", f"must be in [1, {len(names)}], got {config.multistage.k}")
    if not 0.0 <= config.multistage.replay < 1.0:
        _fail("multistage.replay", f"must be in [0, 1), got {config.multistage.replay}")
    if config.forgetting.enabled:
        pair = tuple(config.forgetting.pair)
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(names):
            _fail("forgetting.pair", f"must be two different tasks of {names}, got {pair}")
        if config.forgetting.steps < 1:
            _fail("forgetting.steps", f"must be >= 1, got {config.forgetting.steps}")
    if config.merge_only.enabled:
        available = merges.available()
        for name in config.merge_only.operators or available:
            if name not in available:
                _fail("merge_only.operators", f"names unknown operator {name!r}; available: "
                      f"{', '.join(available)}")
            try:  # its declarations decide, before any work, whether the stage applies
                merges.get_module(name)
            except ValueError as err:
                _fail("merge_only.operators", f"names operator {name!r}, which cannot be loaded: "
                      f"{err}")
    for p in config.ablations.p_values:
        _check_cpift(config.cpift.copy_and_resolve_references(), "ablations.p_values", p=p)
    for order in config.ablations.get("stage_orders", ()):
        if order not in clustering.STAGE_ORDERS:
            _fail("ablations.stage_orders", f"names unknown order {order!r}; known: "
                  f"{clustering.STAGE_ORDERS}")


def _check_cpift(c, key: str, p: float | None = None) -> None:
    p = c.p if p is None else p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        _fail(f"{key}.p" if key == "cpift" else key, f"must be in (0, 1], got {p!r}")
    if isinstance(c.tau, bool) or not isinstance(c.tau, (int, float)) or not 0.0 <= c.tau <= 1.0:
        _fail(f"{key}.tau", f"must be in [0, 1], got {c.tau!r}")
    if c.overlap not in fusion.OVERLAP_RULES:
        _fail(f"{key}.overlap", f"must be one of {fusion.OVERLAP_RULES}, got {c.overlap!r}")
    if c.merge not in merges.available():
        _fail(f"{key}.merge", f"names unknown operator {c.merge!r}")
    if c.stage_order not in clustering.STAGE_ORDERS:
        _fail(f"{key}.stage_order", f"must be one of {clustering.STAGE_ORDERS}")
    if c.backbone not in BACKBONES and not Path(os.path.expanduser(c.backbone)).exists():
        _fail(f"{key}.backbone", f"must be one of {BACKBONES} or an existing Orbax checkpoint "
              f"path, got {c.backbone!r}")
    if not 0.0 <= c.replay < 1.0:
        _fail(f"{key}.replay", f"must be in [0, 1), got {c.replay}")
    if c.steps_per_task < 1:
        _fail(f"{key}.steps_per_task", f"must be >= 1, got {c.steps_per_task}")


# ------------------------------------------------------------------------------------ budgets


def learning_rate(config) -> float:
    """The peak learning rate a run uses: ``train.optimizer.learning_rate``, or, with
    ``train.lr_reference_width = w0 > 0``, that rate scaled by ``w0 / model.hidden_size``.

    The rule: with Adam, an update's size per entry does not depend on the width, while a hidden
    layer's output sums ``width`` such updates, so keeping the change of the activations fixed
    when the width grows asks for a step ``~ 1 / width`` (muP's hidden-layer rule for Adam; Yang
    et al. 2022, "Tensor Programs V", Table 3). It is applied to every parameter here, a
    simplification stated in docs/cpift_benchmark.md; a capacity sweep then keeps one tuned rate
    at the reference width instead of retuning per width."""
    lr = float(config.train.optimizer.learning_rate)
    w0 = config.train.get("lr_reference_width", 0)
    if not w0:
        return lr
    if config.model.backend != "toy":
        _fail("train.lr_reference_width", "scales the rate by the toy model's hidden_size; set it "
              "to 0 for a pretrained checkpoint")
    return lr * float(w0) / float(config.model.hidden_size)


def _method_steps(config) -> dict[str, int]:
    """Optimizer steps of each trained method, one seed (``methods`` docstring): ``n`` tasks,
    ``S = train.steps_per_task``; experts, full SFT at equal compute and each multi-stage order
    ``n S``, equal steps ``S``, CPI-FT's pipeline ``n * cpift.steps_per_task``."""
    n, s = len(tasks_lib.names(config)), int(config.train.steps_per_task)
    return {"single_task": n * s, "multitask_sft": n * s, "multitask_sft_equal_steps": s,
            "multistage_random": n * s, "multistage_heuristic": n * s,
            "cpift": n * int(config.cpift.steps_per_task)}


def budgets(config) -> dict[str, str]:
    """Human-readable training budget of every method (``cpift_jax.benchmark.methods`` docstring)."""
    n, s, b = len(tasks_lib.names(config)), config.train.steps_per_task, config.train.batch_size
    steps, stages = _method_steps(config), f"over K={config.multistage.k} stages"
    return {
        "single_task": f"{n} x {s} steps x {b} seqs (one expert per task)",
        "multitask_sft": f"{steps['multitask_sft']} steps x {b} seqs, equal compute",
        "multitask_sft_equal_steps": f"{steps['multitask_sft_equal_steps']} steps x {b} seqs, "
                                     "equal steps",
        "multistage_random": f"{steps['multistage_random']} steps x {b} seqs {stages}",
        "multistage_heuristic": f"{steps['multistage_heuristic']} steps x {b} seqs {stages}",
        "fused_only": f"probes {n} x {s} steps; no SFT after fusion",
        "cpift": f"probes {n} x {s} + pipeline {steps['cpift']} steps x {b} seqs",
    }


def optimizer_steps(config) -> dict[str, int]:
    """Optimizer steps of one seed by stage: the experts, every other trained method in
    ``config.methods`` (``_method_steps``; 0 when left out), the forgetting pair ``4 F``
    (``F = forgetting.steps``: full SFT's and multi-stage's B legs, CPI-FT's two legs) and, with
    ``analysis.core_stability``, the half-budget probes ``n max(1, S // 2)``. Ablations and
    merge-only are not counted."""
    n, s = len(tasks_lib.names(config)), int(config.train.steps_per_task)
    steps, want = _method_steps(config), set(config.methods)
    return {
        "experts": steps["single_task"],
        **{m: steps[m] if m in want else 0 for m in steps if m != "single_task"},
        "forgetting": 4 * int(config.forgetting.steps) if config.forgetting.enabled else 0,
        "half_probes": n * max(1, s // 2) if config.analysis.get("core_stability", False) else 0,
    }


def ablation_variants(config) -> dict[str, tuple[str, dict]]:
    """``{key: (label, overrides of config.cpift)}`` for the enabled ablations."""
    a = config.ablations
    if not a.enabled:
        return {}
    out = {
        "ablation_tau0": ("CPI-FT, tau = 0 (one group)", {"tau": 0.0}),
        "ablation_linear": ("CPI-FT, linear averaging instead of SLERP", {"merge": "linear"}),
        "ablation_no_freeze": ("CPI-FT, no freezing", {"freeze": False}),
        "ablation_no_embed_head": ("CPI-FT, cores without embeddings/head",
                                   {"core_exclude": ("embed", "lm_head")}),
        "ablation_no_replay": ("CPI-FT, stage data group-only (no replay)", {"replay": 0.0}),
    }
    for p in a.p_values:
        out[f"ablation_p{p * 100:g}"] = (f"CPI-FT, p = {p * 100:g}%", {"p": p})
    for order in a.get("stage_orders", ()):
        out[f"ablation_order_{order}"] = (f"CPI-FT, stage order {order}", {"stage_order": order})
    return out
