"""The CPI-FT benchmark: the pipeline and its baselines chained through artifacts in a workdir.

``run(config, workdir)`` runs these stages (``cpift_jax.benchmark.workdir.Workdir``: a rerun skips every
completed stage, a workdir made with another config is refused naming the differing keys):

    base                       the base model (toy: cached pretraining; or SmolLM2), Orbax
    seed<s>/experts            probe SFT per task = the single-task experts, Orbax per task
    seed<s>/cores              core masks (top p of |expert - base|), bit-packed per task
    seed<s>/half_probes        with ``config.analysis.core_stability``: cores of probes at half
                               the budget (``cpift_jax.benchmark.core_stability``)
    seed<s>/clusters           Jaccard overlap matrix, groups at tau, stage order
    seed<s>/fusion             fused model (cores transplanted, the rest merged), Orbax
    seed<s>/cpift              pipeline SFT with earlier groups' cores frozen
    seed<s>/<baseline>         multitask_sft, multitask_sft_equal_steps, multistage_random,
                               multistage_heuristic (budgets in ``cpift_jax.benchmark.methods``)
    seed<s>/forgetting         sequential A -> B (``cpift_jax.benchmark.forgetting``)
    seed<s>/ablation_<name>    CPI-FT variants (``config.ablations``)
    seed<s>/merge_<name>       merge-only operators on the experts (``config.merge_only``); one
                               whose declarations exclude the setting is recorded as
                               ``{"status": "not_applicable", "reason": ...}``
    results                    ``results.json`` (``aggregate.Results``) + the report (and
                               ``core_stability.json``/``.md``: cores across seeds and lengths)

Every stage returns a JSON result stored in its ``DONE.json``; ``results`` aggregates them over
seeds (mean and population std) and calls ``cpift_jax.benchmark.report.write``.

Devices: every stage runs on the mesh of ``config.mesh`` (``cpift_jax.sharding``); models stay
on it between the stages of one process (each is saved, sharded, and kept in memory), and a
later run loads them back onto the mesh with the parameters' shardings. With several processes
(``experiments/cpift.py --num_processes``) every process runs every stage; only process 0 writes
JSON, reports and plots (``cpift_jax.benchmark.workdir``, ``docs/multihost.md``). With
``config.train.checkpoint_every`` every training run checkpoints its state and resumes after an
interruption.

Tasks: the synthetic suite or real datasets (``cpift_jax.benchmark.tasks``). Config checks,
labels and budgets: ``cpift_jax.benchmark.config_checks``. Normalisation:
``cpift_jax.benchmark.aggregate.NORMALIZATION`` (per task (score - floor) / (expert - floor),
averaged over the tasks whose expert beats the floor by at least 0.05; the floor is chance on
the synthetic suite and the base model's score on real tasks).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
from absl import logging

from cpift_jax import cache as cache_lib
from cpift_jax import clustering, distributed, merges, models, sharding
from cpift_jax.benchmark import aggregate
from cpift_jax.training import checkpoints
from cpift_jax.benchmark import methods
from cpift_jax.benchmark import forgetting as forgetting_lib
from cpift_jax import tree as tree_lib
from cpift_jax.benchmark import tasks as tasks_lib
from cpift_jax.benchmark import config_checks
from cpift_jax.benchmark.config_checks import (LABELS, MAIN_METHODS,  # noqa: F401
                                       ablation_variants, budgets, check_config)
from cpift_jax.benchmark.workdir import Workdir
from cpift_jax.training import step as step_lib

__all__ = ["MAIN_METHODS", "LABELS", "check_config", "budgets", "ablation_variants", "context",
           "run"]

# ------------------------------------------------------------------------------ model and data


def _toy_model(config):
    from cpift_jax.data.tokenizer import CharTokenizer
    m = config.model
    tokenizer = CharTokenizer(config.suite.tasks)
    return models.ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=max(config.data.seq_len, config.base.pretrain.seq_len)), tokenizer


def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    from cpift_jax.data.tokenizer import HFTokenizer
    return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))


def _model_and_tokenizer(config):
    """(model_config, tokenizer) of ``config.model.backend``, without the weights."""
    m = config.model
    if m.backend == "toy":
        return _toy_model(config)
    if m.backend == "hf":
        from cpift_jax.models import hf
        path = os.path.expanduser(m.hf_path)
        return hf.load_config(path), _hf_tokenizer(path)
    from cpift_jax.data.tokenizer import HFTokenizer
    from cpift_jax.models import smollm2

    model_config, hf_tok = smollm2.load_config_and_tokenizer()
    return model_config, HFTokenizer(hf_tok)


def _build_base(config, like):
    """(model_config, tokenizer, base params on the mesh) for ``config.model.backend``;
    ``like(model_config)`` gives the parameters' restore targets (shapes and shardings)."""
    m = config.model
    if m.backend == "toy":
        from cpift_jax.training import pretrain
        model_config, tokenizer = _toy_model(config)
        params = pretrain.cached_base(model_config, tokenizer, config.suite, config.base.pretrain,
                                      progress=config.progress)
    elif m.backend == "hf":  # each process reads only the slices its devices hold
        from cpift_jax.models import hf
        model_config, tokenizer = _model_and_tokenizer(config)
        targets = like(model_config)
        _, params = hf.load(os.path.expanduser(m.hf_path),
                            shardings=jax.tree.map(lambda x: x.sharding, targets))
        return model_config, tokenizer, params
    else:
        from cpift_jax.data.tokenizer import HFTokenizer
        from cpift_jax.models import smollm2
        model_config, params, hf_tok = smollm2.load()
        tokenizer = HFTokenizer(hf_tok)
    targets = like(model_config)
    return model_config, tokenizer, sharding.shard(params, jax.tree.map(lambda x: x.sharding,
                                                                        targets))


class _Run:
    """One ``run`` call: the workdir, the shared model and per-seed contexts, loaded artifacts."""

    def __init__(self, config, workdir):
        self.config = config
        self.wd = Workdir(workdir, config.to_dict(), ignore_keys=("progress", "compile_cache"))
        self.tasks = tasks_lib.names(config)
        self.mesh = sharding.make_mesh(config.mesh)
        self.step_config = step_lib.StepConfig.from_config(config.train.step)
        # Fails now, not after the base model is built, if the rows do not divide over the mesh.
        step_lib.batch_sharding(self.mesh, config.train.batch_size,
                                micro_batches=self.step_config.micro_batches)
        self._base = None
        self._ctx: dict[int, methods.Context] = {}
        self._models: dict[tuple[str, str], object] = {}  # (stage, name) -> params on the mesh
        self._masks: dict[tuple[int, str], object] = {}  # (seed, task) -> core mask on the mesh
        self._like: dict = {}  # model config -> restore targets (``like``)

    def forget(self, seed: int) -> None:
        """Drops the models and masks of ``seed`` from memory (they stay in the workdir)."""
        prefix = f"seed{seed}/"
        self._models = {k: v for k, v in self._models.items() if not k[0].startswith(prefix)}
        self._masks = {k: v for k, v in self._masks.items() if k[0] != seed}
        self._ctx.pop(seed, None)

    def like(self, model_config):
        """The parameters' abstract shapes with their shardings on the mesh (restore targets);
        planned once, so the divisibility fallback's warnings appear once."""
        if model_config not in self._like:
            abstract = models.abstract_params(model_config)
            shardings = sharding.shardings(abstract, self.mesh, self.config.mesh)
            self._like[model_config] = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                shardings)
        return self._like[model_config]

    def keep(self, stage: str, name: str, params, stage_dir: Path) -> None:
        """Saves ``params`` (sharded, from every process) and keeps them for later stages."""
        checkpoints.save_params(stage_dir / name, params)
        self._models[(stage, name)] = params

    # -- base model
    def base(self):
        if self._base is None:
            holder = {}

            def stage(d):
                mc, tok, params = _build_base(self.config, self.like)
                self.keep("base", "params", params, d)
                holder["built"] = (mc, tok)
                return {"num_params": tree_lib.num_params(params)}

            self.wd.run("base", stage)
            if "built" in holder:
                mc, tok = holder["built"]
            else:  # tokenizer and config are cheap to rebuild; the weights come from the workdir
                mc, tok = _model_and_tokenizer(self.config)
            try:
                params = self.load_params("base", "params", mc)
            except ValueError as err:
                raise ValueError(f"the base checkpoint in {self.wd.path('base')} does not match "
                                 f"config.model: {err}") from err
            self._base = (mc, tok, params)
        return self._base

    def ctx(self, seed: int, stage_dir: Path | None = None) -> methods.Context:
        if seed not in self._ctx:
            mc, tok, base = self.base()
            c = self.config
            task_set = tasks_lib.build(c, mc, tok, seed)
            optimizer = c.train.optimizer.copy_and_resolve_references()
            optimizer.learning_rate = config_checks.learning_rate(c)
            self._ctx[seed] = methods.Context(
                model_config=mc, tokenizer=tok, base=base, tasks=self.tasks,
                train_arrays=task_set.train_arrays, evaluator=task_set.evaluate,
                mixture=task_set.mixture, optimizer=optimizer,
                batch_size=c.train.batch_size, steps_per_task=c.train.steps_per_task, seed=seed,
                mesh=self.mesh, step_config=self.step_config,
                checkpoint_every=c.train.checkpoint_every, progress=c.progress)
        return dataclasses.replace(self._ctx[seed], stage_dir=stage_dir)

    # -- artifacts
    def load_params(self, stage: str, name: str, model_config=None):
        """Params ``name`` of ``stage``: kept from this process's run of the stage, else
        restored from its checkpoint onto the mesh."""
        if (stage, name) not in self._models:
            mc = self.base()[0] if model_config is None else model_config
            self._models[(stage, name)] = checkpoints.load_params(self.wd.path(stage) / name,
                                                                  self.like(mc))
        return self._models[(stage, name)]

    def experts(self, seed: int) -> list:
        return [self.load_params(f"seed{seed}/experts", t) for t in self.tasks]

    def cores(self, seed: int, tasks=None) -> list:
        """The cores stage's masks of ``tasks`` (default: every task), in that order."""
        like = self.base()[2]
        for t in self.tasks if tasks is None else tasks:
            if (seed, t) not in self._masks:
                path = self.wd.path(f"seed{seed}/cores") / t
                self._masks[(seed, t)] = checkpoints.load_masks(path, like)
        return [self._masks[(seed, t)] for t in (self.tasks if tasks is None else tasks)]

    # -- per-seed stages
    def seed_stages(self, seed: int) -> None:
        c, wd, p = self.config, self.wd, f"seed{seed}/"
        want = set(c.methods)
        n = len(self.tasks)

        def experts(d):
            ctx = self.ctx(seed, d)
            scores, examples = {}, {}
            for i, t in enumerate(self.tasks):
                params = methods.train_on(ctx, ctx.base, {t: 1.0}, ctx.steps_per_task,
                                          stream=i, name=f"expert_{t}")
                self.keep(p + "experts", t, params, d)
                result = methods.scored(ctx, params)
                scores[t], examples[t] = result["per_task"], result["per_example"]
            base = methods.scored(ctx, ctx.base)
            return {"scores": scores, "per_example": examples, "base": base["per_task"],
                    "base_per_example": base["per_example"]}

        expert_result = wd.run(p + "experts", experts)

        def multitask(steps, save):
            def stage(d):
                ctx = self.ctx(seed, d)
                params = methods.train_on(ctx, ctx.base, dict(ctx.mixture), steps, stream=50,
                                          name="multitask")
                if save:
                    self.keep(p + "multitask_sft", "params", params, d)
                return methods.scored(ctx, params)
            return stage

        needs_mt = "multitask_sft" in want or c.cpift.backbone == "multitask_sft"
        if needs_mt:
            wd.run(p + "multitask_sft", multitask(n * c.train.steps_per_task, True))
        if "multitask_sft_equal_steps" in want:
            wd.run(p + "multitask_sft_equal_steps", multitask(c.train.steps_per_task, False))

        def multistage_stage(groups_fn):
            def stage(d):
                ctx = self.ctx(seed, d)
                groups = groups_fn()
                params, _ = methods.multistage(ctx, ctx.base, groups,
                                               steps_per_task=ctx.steps_per_task,
                                               replay=c.multistage.replay, name="stage")
                return {**methods.scored(ctx, params), "groups": groups}
            return stage

        def random_groups():
            idx = clustering.random_groups(n, c.multistage.k, seed)
            idx = clustering.order_stages(idx, "random", seed)
            return [[self.tasks[i] for i in g] for g in idx]

        def heuristic():
            diag = {t: expert_result["scores"][t][t] for t in self.tasks}
            return methods.heuristic_groups(self.tasks, diag, c.multistage.k)

        if "multistage_random" in want:
            wd.run(p + "multistage_random", multistage_stage(random_groups))
        if "multistage_heuristic" in want:
            wd.run(p + "multistage_heuristic", multistage_stage(heuristic))

        if want & {"fused_only", "cpift"} or c.forgetting.enabled or c.ablations.enabled:
            self.cpift_stages(seed)
        if c.forgetting.enabled:
            def forget(d):
                ctx = self.ctx(seed, d)
                pair = tuple(c.forgetting.pair)
                experts = dict(zip(self.tasks, self.experts(seed)))
                return forgetting_lib.run_seed(ctx, experts, pair, c.cpift, c.multistage.replay,
                                               c.forgetting.steps, cores=self.cores(seed, pair))
            wd.run(p + "forgetting", forget)
        for key, (_, overrides) in ablation_variants(c).items():
            def ablation(d, overrides=overrides, key=key):
                ctx = self.ctx(seed, d)
                cfg = c.cpift.copy_and_resolve_references()
                cfg.update(overrides)
                cores = self.cores(seed) if methods.keeps_cores(c.cpift, overrides) else None
                return methods.cpift_chain(ctx, self.experts(seed), cfg, cores=cores,
                                           backbone=self.backbone(seed), probes=self.probes(seed),
                                           name=key)
            wd.run(p + key, ablation)
        if c.merge_only.enabled:
            for name in c.merge_only.operators or merges.available():
                self.merge_only_stage(seed, name)

    def merge_only_stage(self, seed: int, name: str) -> dict:
        """Stage ``seed<s>/merge_<name>``: operator ``name`` on the experts with base = the base
        model. An operator whose declarations exclude this setting (``merges.applicable``) is
        recorded as ``{"status": "not_applicable", "reason": ...}`` without running it; any
        error the operator raises fails the run naming the stage, and with no DONE marker
        written the next run retries it."""
        stage = f"seed{seed}/merge_{name}"
        ok, reason = merges.applicable(name, len(self.tasks), has_base=True)

        def merge(d):
            if not ok:
                logging.info("stage %s: not applicable (%s)", stage, reason)
                return {"status": aggregate.NOT_APPLICABLE, "reason": reason}
            ctx = self.ctx(seed, d)
            experts = self.experts(seed)
            try:
                return methods.merge_only(ctx, experts, name)
            except Exception as err:  # re-raised with the stage named, not recorded
                raise RuntimeError(f"stage {stage} failed: merge operator {name!r} raised "
                                   f"{type(err).__name__}: {err}") from err

        return self.wd.run(stage, merge)

    def probes(self, seed: int) -> dict:
        """``methods.probe_effects`` of this seed's experts stage."""
        return methods.probe_effects(self.tasks, self.wd.result(f"seed{seed}/experts"))

    def backbone(self, seed: int):
        b = self.config.cpift.backbone
        if b == "base":
            return self.base()[2]
        if b == "multitask_sft":
            return self.load_params(f"seed{seed}/multitask_sft", "params")
        return checkpoints.load_params(os.path.expanduser(b), self.like(self.base()[0]))

    def cpift_stages(self, seed: int) -> None:
        c, wd, p = self.config, self.wd, f"seed{seed}/"

        def cores(d):
            ctx = self.ctx(seed, d)
            masks_ = methods.core_masks(ctx.base, self.experts(seed), c.cpift)
            for t, m in zip(self.tasks, masks_):
                checkpoints.save_masks(d / t, m)
                self._masks[(seed, t)] = m
            return {"density": {t: methods.core_density(m)
                                for t, m in zip(self.tasks, masks_)}}

        wd.run(p + "cores", cores)

        if _core_stability(c):
            def half_probes(d):
                ctx = self.ctx(seed, d)
                steps = max(1, ctx.steps_per_task // 2)
                for i, t in enumerate(self.tasks):  # stream i: the expert's own batch order
                    params = methods.train_on(ctx, ctx.base, {t: 1.0}, steps, stream=i,
                                              name=f"half_{t}")
                    checkpoints.save_masks(d / t, methods.core_masks(ctx.base, [params],
                                                                     c.cpift)[0])
                return {"steps": steps}

            wd.run(p + "half_probes", half_probes)

        def clusters(d):
            overlap, groups = methods.cluster(self.tasks, self.cores(seed), c.cpift, seed,
                                              probes=self.probes(seed))
            return {"overlap": overlap.tolist(), "groups": groups}

        groups = wd.run(p + "clusters", clusters)["groups"]

        def fuse(d):
            ctx = self.ctx(seed, d)
            fused, report = methods.fuse(self.backbone(seed), self.experts(seed), self.cores(seed),
                                         c.cpift)
            self.keep(p + "fusion", "params", fused, d)
            return {**methods.scored(ctx, fused), "report": report}

        wd.run(p + "fusion", fuse)

        def pipeline_sft(d):
            ctx = self.ctx(seed, d)
            fused = self.load_params(p + "fusion", "params")
            by_task = dict(zip(self.tasks, self.cores(seed)))
            final, _ = methods.pipeline_sft(ctx, fused, groups, by_task, c.cpift)
            return {**methods.scored(ctx, final), "groups": groups}

        wd.run(p + "cpift", pipeline_sft)


# ---------------------------------------------------------------------------------------- run


def _enable_compile_cache(enabled: bool) -> None:
    """XLA's persistent cache (``$CPIFT_CACHE/xla``): a later run (and every seed's evaluation
    and merge programs) finds its compiled programs there instead of compiling them again."""
    if enabled:
        jax.config.update("jax_compilation_cache_dir", str(cache_lib.cache_dir("xla")))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _core_stability(config) -> bool:
    return bool(config.get("analysis") and config.analysis.get("core_stability", False))


def _write_core_stability(config, r: _Run, d: Path) -> None:
    """``core_stability.json`` / ``.md`` in ``d`` (``cpift_jax.benchmark.core_stability``)."""
    from cpift_jax.benchmark import core_stability

    like = r.base()[2]
    seeds = [int(s) for s in config.seeds]
    full = {s: dict(zip(r.tasks, r.cores(s))) for s in seeds}
    half = {s: {t: checkpoints.load_masks(r.wd.path(f"seed{s}/half_probes") / t, like)
                for t in r.tasks} for s in seeds}
    summary = core_stability.summarize(r.tasks, full, half)
    distributed.write_json(d / "core_stability.json", summary)
    distributed.write_text(d / "core_stability.md", core_stability.format_table(summary) + "\n")


def _floors(config, r: _Run) -> dict[str, float]:
    """Normalisation floors (``cpift_jax.benchmark.tasks``): chance levels of the synthetic
    suite, or the base model's scores on the real tasks (the same on every seed: one base model,
    one held-out set)."""
    if not tasks_lib.is_real(config):
        return tasks_lib.synthetic_floors(config)
    first = int(config.seeds[0])
    return dict(r.wd.result(f"seed{first}/experts")["base"])


def _start(config, workdir) -> _Run:
    """A checked run of ``config`` in ``workdir`` with its base stage run or read back."""
    check_config(config)
    _enable_compile_cache(config.compile_cache)
    r = _Run(config, workdir)
    r.base()
    return r


def context(config, workdir, seed: int) -> methods.Context:
    """Seed ``seed``'s ``methods.Context`` as ``run`` builds it (the base stage is run or read
    back in ``workdir``; data tokenized, the mesh and step options of ``config``), for tools that
    time or inspect one method without running the stages (``experiments/step_time.py``)."""
    return _start(config, workdir).ctx(int(seed))


def run(config, workdir) -> aggregate.Results:
    """Runs (or resumes) every stage and returns the ``aggregate.Results`` written to
    ``workdir/results.json``; ``cpift_jax.benchmark.report.write`` renders ``results.md`` and
    plots from it."""
    r = _start(config, workdir)
    for seed in config.seeds:
        r.seed_stages(int(seed))
        r.forget(int(seed))

    ablations = ablation_variants(config)

    def results_stage(d):
        normalization = (aggregate.BASE_NORMALIZATION if tasks_lib.is_real(config)
                         else aggregate.NORMALIZATION)
        aggregate.collect(config, r.wd, r.tasks, _floors(config, r), normalization=normalization,
                          metrics=tasks_lib.metric_labels(config), labels=LABELS, budgets=budgets(config),
                          ablations=ablations, forgetting_labels=forgetting_lib.LABELS,
                          ).save(d / "results.json")
        if _core_stability(config):
            _write_core_stability(config, r, d)
        return {"file": str(d / "results.json")}

    r.wd.run("results", results_stage)
    results = aggregate.Results.load(r.wd.path("results") / "results.json")
    results = dataclasses.replace(results, timings=aggregate.timings(r.wd))
    if distributed.is_primary():
        results.save(r.wd.root / "results.json")
        from cpift_jax.benchmark import report  # imported late: it pulls in plotting
        report.write(r.wd.root, results)
    return results
