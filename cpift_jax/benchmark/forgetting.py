"""Forgetting in two-task sequential training, shaped like Table 2 of arXiv 2508.21741.

Tasks A then B (``pair``), one seed, ``L = steps`` per leg, ``acc_T(theta)`` the held-out exact
match of ``theta`` on task T, ``theta_0`` the base model, ``E_A`` / ``E_B`` the single-task
experts (the benchmark's probes, ``steps_per_task`` steps from ``theta_0`` on A / B alone):

* **full SFT**: ``theta_A = E_A``; ``theta_AB`` = ``theta_A`` + ``L`` steps on B, all entries
  trainable, no replay.
* **multi-stage**: ``theta_A = E_A``; ``theta_AB`` = ``theta_A`` + ``L`` steps on B with the
  multi-stage rule of the main benchmark (a share ``replay`` of every batch is A's data).
* **CPI-FT**: cores ``C_A``, ``C_B`` of ``E_A``, ``E_B``; ``F`` = fusion of (``E_A``, ``E_B``)
  on the base model; ``theta_A`` = ``F`` + ``L`` steps on A (stage 1); ``theta_AB`` =
  ``theta_A`` + ``L`` steps on B with ``C_A`` frozen and the same replay (stage 2). The two tasks
  are forced into separate stages whatever their overlap, so the experiment is sequential.

Reported per method: ``drop_a = acc_A(theta_AB) - acc_A(theta_A)`` (negative = forgotten) and
``gain_b = acc_B(theta_AB) - acc_B(theta_0)`` (B still learned), and the per-example values
behind them (``per_example``: ``after_a`` and ``after_ab`` on A and B, ``base_b`` on B), from
which ``cpift_jax.benchmark.comparisons.forgetting_intervals`` draws paired bootstrap intervals
over seeds and examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cpift_jax.benchmark import methods

__all__ = ["LABELS", "run_seed"]

LABELS = {"full_sft": "Full SFT (A -> B)", "multistage": "Multi-stage SFT (A -> B, replay)",
          "cpift": "CPI-FT (A -> B, A's core frozen)"}


def run_seed(ctx: methods.Context, experts: Mapping[str, Any], pair: tuple[str, str],
             cpift_cfg, replay: float, steps: int, cores: Sequence[Any] | None = None) -> dict:
    """``{method: {"drop_a", "gain_b", "acc": {...}, "per_example": {...}}}`` for one seed
    (module docstring). ``cores``: ``[C_A, C_B]`` if already computed with ``cpift_cfg`` (else
    computed here)."""
    a, b = pair
    base_b = methods.evaluate_examples(ctx, ctx.base, [b])[b]
    out = {}

    def scores(detailed):
        return {t: s.score for t, s in detailed.items()}

    def values(detailed):
        return {t: list(s.per_example) for t, s in detailed.items()}

    def record(key, after_a, theta_ab):
        after_ab = methods.evaluate_examples(ctx, theta_ab, [a, b])
        out[key] = {"drop_a": after_ab[a].score - after_a[a].score,
                    "gain_b": after_ab[b].score - base_b.score,
                    "acc": {"after_a": scores(after_a), "after_ab": scores(after_ab),
                            "base_b": base_b.score},
                    "per_example": {"after_a": values(after_a), "after_ab": values(after_ab),
                                    "base_b": list(base_b.per_example)}}

    theta_a = experts[a]
    acc_expert_a = methods.evaluate_examples(ctx, theta_a, [a, b])  # full and multi-stage start
    full = methods.train_on(ctx, theta_a, {b: 1.0}, steps, stream=500, name="forget_full")
    record("full_sft", acc_expert_a, full)
    weights = methods.stage_weights(ctx, [b], [a], replay)
    staged = methods.train_on(ctx, theta_a, weights, steps, stream=501, name="forget_multistage")
    record("multistage", acc_expert_a, staged)

    if cores is None:
        cores = methods.core_masks(ctx.base, [experts[a], experts[b]], cpift_cfg)
    fused, _ = methods.fuse(ctx.base, [experts[a], experts[b]], list(cores), cpift_cfg)
    stage1 = methods.train_on(ctx, fused, {a: 1.0}, steps, stream=502, name="forget_cpift0")
    frozen = cores[0] if cpift_cfg.freeze else None
    stage2 = methods.train_on(ctx, stage1, weights, steps, frozen=frozen, stream=503,
                              name="forget_cpift1")
    record("cpift", methods.evaluate_examples(ctx, stage1, [a, b]), stage2)
    return out
