"""CPI fusion as a dataless merge operator: transplant each model's core, merge the rest.

Step 4 of Core Parameter Isolation Fine-Tuning (Wang et al., 2025, "Not All Parameters Are
Created Equal: Smart Isolation Boosts Fine-Tuning Performance", arXiv 2508.21741, EMNLP),
usable on any fine-tunes of one base without the training data:

1. Core regions: C_i = the top ``fraction`` of entries of |theta_i - base|
   (``cpift_jax.masks.core_mask``; ``scope="global"`` ranks the whole model once, the paper's
   rule with p = 1%; ``scope="leaf"`` ranks every leaf on its own). Exactly
   ``floor(fraction * D)`` entries per model, ties broken by flatten order.
2. Transplant: an entry in one core takes that model's value; an entry in several cores follows
   ``overlap``: ``"max_delta"`` (default; the model that moved it most, ties to the lower
   index), ``"mean"`` or ``"first"``.
3. Every other entry is merged across the models with operator ``inner`` (default ``"slerp"``,
   the paper's choice: a sequential fold with t_i = 1/i, linear when nearly colinear, norms and
   cosines over the non-core entries only). Extra keyword arguments are ``inner``'s options
   (``t``, ``granularity``, ``density``, ...); ``weights`` goes to ``inner`` too.

This is ``cpift_jax.fusion.fuse(base, models, masks, merge=inner, overlap=overlap, ...)`` with
its report dropped; use ``fusion.fuse`` directly for the report or a device mesh.
Float32 inside, the input dtype out.

Degenerate cases: ``base`` is required (the cores are measured from it; ``ValueError``
without it). A fraction so small that ``floor(fraction * D) = 0`` gives empty cores and the
result is ``inner`` alone. Models equal to base give base back (every delta is 0, so the cores
are arbitrary tied entries holding base's value). One model: its core is its own value and the
inner merge of one model is that model, so the model comes back.

Under ``jax.jit`` (traced inputs) ``fusion.fuse`` cannot run: it dispatches precompiled
per-leaf programs and reads its report back to the host. ``fusion.fuse_leafwise`` then composes
the same result from jittable parts: ``inner`` on the non-core entries (``mask=~U`` for operators that take a mask,
as ``fuse`` does), then the core values by the same overlap rule. Eager calls use ``fuse``; the
conformance test checks that both paths agree. The NaN/Inf check on the deltas is skipped
under jit (``core_mask`` reads values only when eager).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from cpift_jax import fusion
from cpift_jax import masks as masks_lib
from cpift_jax.merges._common import check_models

REQUIRES_BASE = True
MIN_MODELS = 1
MAX_MODELS = None
FORWARDS_KWARGS = True  # **inner_kw go to ``inner``, which rejects unknown names
# 75 entries in the conformance tree: 10% gives 7 core entries per model, so both the
# transplant and the inner merge are exercised.
EXAMPLE_HPARAMS = {"fraction": 0.1}


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    fraction: float = 0.01,
    scope: str = "global",
    overlap: str = "max_delta",
    inner: str = "slerp",
    **inner_kw,
):
    if base is None:
        raise ValueError(
            "cpi needs base= (the model the core regions |theta_i - base| are measured from, "
            "usually the pre-trained checkpoint the models were fine-tuned from)"
        )
    check_models(models, base)
    fusion.check_overlap(overlap)  # before the (costly) core masks
    models = list(models)
    core_masks = [masks_lib.core_mask(base, m, fraction, scope) for m in models]
    kwargs = dict(merge=inner, overlap=overlap, weights=weights, **inner_kw)
    # fuse builds its report in NumPy, so any traced input (base or a model) takes the
    # whole-leaf jittable path.
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((base, models))):
        return fusion.fuse_leafwise(base, models, core_masks, **kwargs)
    return fusion.fuse(base, models, core_masks, **kwargs)[0]
