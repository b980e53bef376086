"""The training methods compared by the CPI-FT benchmark, on parameters held in memory.

Everything here is one seed of one method: ``pipeline.py`` chains these through artifacts in a
workdir, repeats them over seeds and aggregates. A ``Context`` holds what every method shares
(model, tokenizer, base parameters, encoded train data, the evaluator, optimiser settings).

Budgets are counted in optimizer steps of ``batch_size`` sequences; ``S = steps_per_task``:

* single-task expert (= the CPI-FT probe): ``S`` steps on its task alone;
* full multi-task SFT, equal compute: ``n_tasks * S`` steps on the mixture (each task gets about
  ``S`` steps' worth of rows, as with the experts); equal steps: ``S`` steps on the mixture;
* multi-stage SFT (groups trained one after another): stage ``g`` gets ``|g| * S`` steps, so the
  total equals full multi-task SFT; later stages replay earlier groups' data (``replay``);
* CPI-FT pipeline SFT: stage ``g`` gets ``|g| * cpift_steps_per_task`` steps, with the core
  entries of earlier groups frozen element-wise (arXiv 2508.21741, Sec. 3, step 5).

Mixture weights inside a stage: the suite's ``mixture_weights`` (its ``imbalance`` knob)
restricted to the stage's tasks, scaled to ``1 - replay``; the earlier groups' tasks share
``replay`` equally (no earlier groups: the stage's tasks get everything).

Devices: every model stays a ``jax.Array`` pytree on ``Context.mesh`` with the parameters'
shardings (``cpift_jax.sharding``); batches come from a per-process ``GlobalBatchLoader``, and
nothing here gathers a model to the host, so the same code runs on one CPU, a device mesh or
many hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cpift_jax import clustering, distributed, fusion, masks, merges
from cpift_jax import tree as tree_lib
from cpift_jax.data import batching
from cpift_jax.data import loader as loader_lib
from cpift_jax.training import step as step_lib
from cpift_jax.training import train as train_lib

__all__ = ["Context", "evaluate", "evaluate_examples", "scored", "train_on", "stage_weights", "multistage", "heuristic_groups",
           "core_masks", "core_density", "probe_effects", "cluster", "fuse", "pipeline_sft", "cpift_chain",
           "merge_only", "KIND_RULES", "OUTSIDE_LAYER_RULES", "layer_group"]

Pytree = Any

# Leaf-path rules for the core-density breakdowns of results.json (first full match wins).
KIND_RULES = [(rf".*{k}.*", k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj")] + [
    (r".*embed.*", "embed"), (r".*(norm|layernorm).*", "norm"), (r".*lm_head.*", "head")]


# Groups of the leaves outside the layer stack in the per-layer breakdown.
OUTSIDE_LAYER_RULES = [(r".*embed.*", "embed"), (r".*model/norm.*", "final_norm"),
                       (r".*lm_head.*", "head")]


def layer_group(path: str) -> str:
    """The per-layer breakdown's group of a leaf: its layer number (``tree.layer_index``) as a
    string, else its ``OUTSIDE_LAYER_RULES`` group; ValueError for a leaf in neither."""
    layer = tree_lib.layer_index(path)
    if layer is not None:
        return str(layer)
    try:
        return tree_lib.match_rule(path, OUTSIDE_LAYER_RULES)
    except KeyError:
        raise ValueError(f"leaf '{path}' is neither in a layer nor in any of "
                         f"{[p for p, _ in OUTSIDE_LAYER_RULES]}") from None


@dataclasses.dataclass
class Context:
    """What all methods of one seed share."""

    model_config: Any
    tokenizer: Any
    base: Pytree
    tasks: tuple[str, ...]
    train_arrays: Mapping[str, dict]  # task -> {"tokens", "loss_mask"} (batching.encode_examples)
    evaluator: Any  # (params, tasks) -> {task: TaskScore} (``tasks.TaskSet.evaluate``)
    mixture: Mapping[str, float]  # suite.mixture_weights
    optimizer: Any  # optim.default_config()-like; total_steps is set per call
    batch_size: int
    steps_per_task: int
    seed: int
    mesh: Any  # the jax.sharding.Mesh every model lives on (config.mesh)
    step_config: Any = None  # training.step.StepConfig (None: the plain step)
    checkpoint_every: int = 0  # mid-stage train-state checkpoints every that many steps (0: off)
    progress: bool = False
    stage_dir: Any = None  # the running stage's directory: loss curves, mid-stage checkpoints

    @property
    def seq_len(self) -> int:
        return next(iter(self.train_arrays.values()))["tokens"].shape[1]


def evaluate_examples(ctx: Context, params: Pytree, tasks: Sequence[str] | None = None) -> dict:
    """``{task: TaskScore}`` on the held-out examples: the task's metric (higher is better) and
    its per-example values (``cpift_jax.benchmark.tasks``)."""
    return ctx.evaluator(params, list(ctx.tasks if tasks is None else tasks))


def scored(ctx: Context, params: Pytree, tasks: Sequence[str] | None = None) -> dict:
    """A stage result's scores: ``{"per_task": {task: score}, "per_example": {task: [...]}}``
    (the per-example values feed the paired statistics, ``cpift_jax.benchmark.statistics``)."""
    detailed = evaluate_examples(ctx, params, tasks)
    return {"per_task": {t: s.score for t, s in detailed.items()},
            "per_example": {t: list(s.per_example) for t, s in detailed.items()}}


def evaluate(ctx: Context, params: Pytree, tasks: Sequence[str] | None = None) -> dict[str, float]:
    """``{task: score}`` on the held-out examples (``evaluate_examples`` without the examples)."""
    return {t: s.score for t, s in evaluate_examples(ctx, params, tasks).items()}


def stage_weights(ctx: Context, current: Sequence[str], earlier: Sequence[str],
                  replay: float) -> dict[str, float]:
    """Sampling weights of one stage (module docstring)."""
    own = {t: ctx.mixture[t] for t in current}
    total = sum(own.values())
    share = 1.0 - replay if earlier and replay > 0 else 1.0
    weights = {t: share * w / total for t, w in own.items()}
    if earlier and replay > 0:
        weights.update({t: replay / len(earlier) for t in earlier})
    return weights


def train_on(ctx: Context, params: Pytree, weights: Mapping[str, float], steps: int, *,
             frozen: Pytree | None = None, stream: int = 0, name: str = "train",
             log_every: int = 25) -> Pytree:
    """``steps`` AdamW steps on a mixture of tasks (``weights``); ``stream`` picks an independent
    batch order so two calls of one seed do not see the same rows in the same order.

    With ``ctx.checkpoint_every`` and a stage directory, the run checkpoints its train state and
    data position under ``<stage_dir>/train_state/<name>`` and, rerun after an interruption,
    resumes there (``train_lib.train``); ``name`` must be unique within a stage. With a stage
    directory, ``<stage_dir>/<name>.jsonl`` gets a metrics record every ``log_every`` steps."""
    from cpift_jax.benchmark.workdir import RESUME_DIR  # workdir imports this module's users

    opt = ctx.optimizer.copy_and_resolve_references()
    opt.total_steps = int(steps)
    opt.warmup_steps = min(int(opt.warmup_steps), int(steps))
    arrays = {t: ctx.train_arrays[t] for t in weights}
    stream_seed = ctx.seed * 7919 + stream
    source = batching.MixtureBatches(arrays, weights, ctx.batch_size, stream_seed)
    step_config = ctx.step_config or step_lib.StepConfig()
    rows = step_lib.batch_sharding(ctx.mesh, ctx.batch_size,
                                   micro_batches=step_config.micro_batches)
    batches = loader_lib.GlobalBatchLoader(source, rows, ctx.seq_len)
    stage_dir = None if ctx.stage_dir is None else Path(ctx.stage_dir)
    metrics = (stage_dir / f"{name}.jsonl"
               if stage_dir is not None and distributed.is_primary() else None)
    resume = (stage_dir / RESUME_DIR / name
              if stage_dir is not None and ctx.checkpoint_every else None)
    out, _ = train_lib.train(ctx.model_config, params, opt, batches, steps=int(steps),
                             frozen=frozen, metrics_path=metrics, log_every=log_every,
                             progress=ctx.progress,
                             description=name, mesh=ctx.mesh, step_config=step_config,
                             checkpoint_dir=resume, checkpoint_every=ctx.checkpoint_every)
    return out



def multistage(ctx: Context, params: Pytree, stages: Sequence[Sequence[str]], *,
               steps_per_task: int, replay: float, frozen_for_stage=None,
               name: str = "stage") -> tuple[Pytree, list[Pytree]]:
    """Trains the groups one after another; returns (final params, params after each stage).

    ``frozen_for_stage(s)`` gives stage ``s``'s freeze mask (None: nothing frozen).
    """
    after = []
    for s, group in enumerate(stages):
        earlier = [t for g in stages[:s] for t in g]
        weights = stage_weights(ctx, group, earlier, replay)
        frozen = frozen_for_stage(s) if frozen_for_stage is not None else None
        params = train_on(ctx, params, weights, len(group) * steps_per_task, frozen=frozen,
                          stream=100 + s, name=f"{name}{s}")
        after.append(params)
    return params, after


def heuristic_groups(tasks: Sequence[str], expert_scores: Mapping[str, float],
                     k: int) -> list[list[str]]:
    """The multi-stage heuristic: tasks sorted easiest first by their expert's score (ties by
    name), cut into ``k`` contiguous groups of balanced size; stages run in that order, so the
    hardest tasks are trained last and forgotten least."""
    ordered = sorted(tasks, key=lambda t: (-expert_scores[t], t))
    bounds = [i * len(ordered) // k for i in range(k + 1)]
    return [ordered[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# ------------------------------------------------------------------------------- CPI-FT steps


# The settings of config.cpift that ``core_masks`` reads: a variant that leaves them at the main
# run's values has the same cores and can reuse them (``keeps_cores``).
CORE_KEYS = ("p", "scope", "core_exclude")


def keeps_cores(cpift_cfg, overrides: Mapping[str, Any]) -> bool:
    """Whether config.cpift ``overrides`` leave every core setting (``CORE_KEYS``) as in
    ``cpift_cfg``, so every task's core mask is the one computed with ``cpift_cfg``."""
    as_value = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return all(as_value(overrides[k]) == as_value(cpift_cfg[k]) for k in CORE_KEYS if k in overrides)


def core_masks(base: Pytree, experts: Sequence[Pytree], cfg) -> list[Pytree]:
    """Step 2: each task's top-``p`` entries by ``|expert - base|`` (``masks.core_mask``), each
    from its own expert alone."""
    exclude = list(cfg.core_exclude) or None
    return [masks.core_mask(base, e, cfg.p, cfg.scope, exclude=exclude) for e in experts]


def core_density(mask: Pytree) -> dict:
    """``{"by_layer": {...}, "by_kind": {...}}``: share of each group's entries in the core
    (groups: ``layer_group`` and ``KIND_RULES``)."""
    by_layer = masks.density_by_group(mask, layer_group)
    by_kind = masks.density_by(mask, KIND_RULES)
    return {"by_layer": {k: v["density"] for k, v in by_layer.items()},
            "by_kind": {str(k): v["density"] for k, v in by_kind.items()}}


def probe_effects(tasks: Sequence[str], experts_result: Mapping) -> dict:
    """What the probes (the experts stage's result) say about the tasks, for the stage orders
    ``backward_transfer`` and ``structured_first`` (``clustering.order_stages``):
    ``transfer[i][j]`` = expert ``i``'s score on task ``j`` minus the base model's, and
    ``gains[t]`` = (expert_t - base_t) / (1 - base_t), the share of the headroom above the base
    model that task ``t``'s own probe gained."""
    scores, base = experts_result["scores"], experts_result["base"]
    transfer = [[scores[a][b] - base[b] for b in tasks] for a in tasks]
    gains = [(scores[t][t] - base[t]) / max(1.0 - base[t], 1e-9) for t in tasks]
    return {"transfer": transfer, "gains": gains}


def cluster(tasks: Sequence[str], cores: Sequence[Pytree], cfg, seed: int,
            sizes: Sequence[float] | None = None,
            probes: Mapping | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """Step 3: Jaccard matrix and the groups (task names) in stage order; ``probes``
    (``probe_effects``) feeds the probe-guided stage orders."""
    overlap = masks.overlap_matrix(cores)
    groups = clustering.cluster_tasks(overlap, cfg.tau)
    probes = probes or {}
    stages = clustering.order_stages(groups, cfg.stage_order, seed, overlap=overlap, sizes=sizes,
                                     transfer=probes.get("transfer"), gains=probes.get("gains"))
    return overlap, [[tasks[i] for i in g] for g in stages]


def fuse(backbone: Pytree, experts: Sequence[Pytree], cores: Sequence[Pytree], cfg):
    """Step 4: ``fusion.fuse`` with the configured overlap rule, merge operator and
    granularity (the granularity applies to SLERP only)."""
    kwargs = {"granularity": cfg.granularity} if cfg.merge == "slerp" else {}
    fused, report = fusion.fuse(backbone, experts, cores, merge=cfg.merge, overlap=cfg.overlap,
                                **kwargs)
    return fused, report


def _union(mask_list: Sequence[Pytree]) -> Pytree:
    return jax.tree.map(lambda *ms: functools.reduce(operator.or_, ms), *mask_list)


def pipeline_sft(ctx: Context, fused: Pytree, stages: Sequence[Sequence[str]],
                 cores_by_task: Mapping[str, Pytree], cfg, *, name: str = "cpift"):
    """Step 5: stage by stage, earlier groups' cores frozen (and the current group's too with
    ``cfg.freeze_current``; nothing with ``cfg.freeze = False``)."""

    def frozen_for_stage(s: int):
        if not cfg.freeze:
            return None
        upto = s + 1 if cfg.freeze_current else s
        tasks = [t for g in stages[:upto] for t in g]
        return _union([cores_by_task[t] for t in tasks]) if tasks else None

    return multistage(ctx, fused, stages, steps_per_task=cfg.steps_per_task, replay=cfg.replay,
                      frozen_for_stage=frozen_for_stage, name=name)


def cpift_chain(ctx: Context, experts: Sequence[Pytree], cfg, *, backbone: Pytree | None = None,
                cores: Sequence[Pytree] | None = None, probes: Mapping | None = None,
                name: str = "cpift") -> dict:
    """Steps 2-5 in memory for one CPI-FT variant (ablations); returns scores and bookkeeping.
    ``cores``: the experts' core masks if already known for ``cfg`` (else computed here)."""
    backbone = ctx.base if backbone is None else backbone
    cores = core_masks(ctx.base, experts, cfg) if cores is None else list(cores)
    overlap, stages = cluster(ctx.tasks, cores, cfg, ctx.seed, probes=probes)
    fused, report = fuse(backbone, experts, cores, cfg)
    by_task = dict(zip(ctx.tasks, cores))
    final, _ = pipeline_sft(ctx, fused, stages, by_task, cfg, name=name)
    return {**scored(ctx, final), "fused_per_task": evaluate(ctx, fused),
            "groups": stages, "overlap": overlap.tolist(), "fusion": report}


def merge_only(ctx: Context, experts: Sequence[Pytree], name: str) -> dict:
    """Registry operator ``name`` with its default settings on the experts, ``base`` = the base
    model; evaluated without any training (``scored``'s result)."""
    merged = merges.get(name)(list(experts), base=ctx.base)
    return scored(ctx, merged)
