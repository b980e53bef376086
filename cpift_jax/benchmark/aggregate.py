"""``results.json`` of the CPI-FT benchmark from the stage results stored in a workdir.

Split out of ``cpift_jax.benchmark.pipeline`` (which runs the stages): this module only reads their
``DONE.json`` results and aggregates over seeds (mean and population std, ``np.std``). The schema
is the one ``cpift_jax.benchmark.report`` renders (README, "results schema").

Normalisation (``NORMALIZATION``): per seed and task, ``(score - chance) / (expert - chance)``
with the same seed's single-task expert, averaged over the tasks whose expert beats chance by at
least ``MIN_EXPERT_GAP``; a task whose expert is at chance carries no signal and is left out
(all left out: NaN).
"""

from __future__ import annotations

from cpift_jax.training.checkpoints import read_json

import numpy as np

__all__ = ["NORMALIZATION", "MIN_EXPERT_GAP", "normalized_average", "stat", "collect"]

MIN_EXPERT_GAP = 0.05
NORMALIZATION = (
    "avg_normalized = mean over tasks t of (score_t - chance_t) / (expert_t - chance_t), with "
    "expert_t the same seed's single-task expert and chance_t the best constant answer's score; "
    f"tasks whose expert is less than {MIN_EXPERT_GAP} above chance are left out (all left out: "
    "NaN); 1 = expert level, 0 = chance; mean and population std over seeds.")


def normalized_average(scores: dict, expert: dict, chance: dict) -> float:
    """``NORMALIZATION`` for one seed: ``{task: score}`` against ``{task: expert score}``."""
    terms = [(scores[t] - chance[t]) / (expert[t] - chance[t]) for t in scores
             if expert[t] - chance[t] >= MIN_EXPERT_GAP]
    return float(np.mean(terms)) if terms else float("nan")


def stat(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def _method(label, block, budget, per_seed_scores: dict, experts: dict, chance, tasks) -> dict:
    per_seed = [{"seed": s, "per_task": {t: float(sc[t]) for t in tasks},
                 "avg_normalized": normalized_average(sc, experts[s], chance)}
                for s, sc in per_seed_scores.items()]
    return {
        "label": label, "block": block, "budget": budget,
        "per_task": {t: stat([r["per_task"][t] for r in per_seed]) for t in tasks},
        "avg_normalized": stat([r["avg_normalized"] for r in per_seed]),
        "per_seed": per_seed,
    }


def collect(config, wd, tasks, chance, *, labels, budgets, ablations, forgetting_labels) -> dict:
    """The results dict (minus timings) from the completed stages of ``wd`` (a Workdir)."""
    seeds = list(config.seeds)
    tasks = list(tasks)

    def result(seed, stage):
        return wd.result(f"seed{seed}/{stage}")

    experts = {s: {t: result(s, "experts")["scores"][t][t] for t in tasks} for s in seeds}
    methods_out = {}

    def add(key, label, block, budget, scores_fn):
        methods_out[key] = _method(label, block, budget, {s: scores_fn(s) for s in seeds},
                                   experts, chance, tasks)

    for key in config.methods:
        stage = {"fused_only": "fusion"}.get(key, key)
        fn = (lambda s: experts[s]) if key == "single_task" else (
            lambda s, stage=stage: result(s, stage)["per_task"])
        add(key, labels[key], "main", budgets[key], fn)
    for key, (label, _) in ablations.items():
        add(key, label, "ablation", budgets["cpift"], lambda s, key=key: result(s, key)["per_task"])
    merge_errors = {}
    if config.merge_only.enabled:
        import cpift_jax.merges as merges_lib
        for name in config.merge_only.operators or merges_lib.available():
            key = f"merge_{name}"
            failed = [result(s, key)["error"] for s in seeds if "error" in result(s, key)]
            if failed:
                merge_errors[key] = failed[0]
                continue
            add(key, f"Merge only: {name}", "merge_only", f"probes {len(tasks)} x "
                f"{config.train.steps_per_task} steps; no SFT after merging",
                lambda s, key=key: result(s, key)["per_task"])

    out = {"config": config.to_dict(), "seeds": seeds, "tasks": tasks, "chance": chance,
           "normalization": NORMALIZATION, "methods": methods_out}
    if merge_errors:
        out["merge_only_errors"] = merge_errors
    if config.forgetting.enabled:
        per = {s: result(s, "forgetting") for s in seeds}
        out["forgetting"] = {"pair": list(config.forgetting.pair), "methods": {
            k: {"label": lab, "drop_a": stat([per[s][k]["drop_a"] for s in seeds]),
                "gain_b": stat([per[s][k]["gain_b"] for s in seeds])}
            for k, lab in forgetting_labels.items()}}
    if wd.done(f"seed{seeds[0]}/clusters"):
        mats = [result(s, "clusters")["overlap"] for s in seeds]
        out["overlap"] = {"tasks": tasks, "matrix": np.mean(mats, axis=0).tolist(),
                          "per_seed": mats}
        out["groups"] = {"per_seed": [result(s, "clusters")["groups"] for s in seeds]}
        out["core_density"] = result(seeds[0], "cores")["density"]
    return out


def stage_seconds(wd) -> dict[str, float]:
    """``{stage: seconds}`` of every completed stage (from its DONE.json), in path order."""
    out = {}
    for marker in sorted(wd.root.rglob("DONE.json")):
        stage = str(marker.parent.relative_to(wd.root))
        if ".partial-" in stage:
            continue
        out[stage] = float(read_json(marker).get("seconds", 0.0))
    return out
