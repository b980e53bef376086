"""The CPI-FT benchmark: stages chained through artifacts in a workdir, and their report.

- ``pipeline``: runs the stages (experts, cores, clusters, every method, forgetting, report).
- ``methods``: the training methods compared (CPI-FT, multi-task SFT, multi-stage SFT, merges).
- ``config_checks``: config validation, method labels, budgets and step counts.
- ``tasks``: the task set of a config (synthetic suite or real datasets) and its evaluator;
  ``real_tasks``: the real datasets' task and evaluation configs and their metrics.
- ``forgetting``: sequential A -> B training.
- ``aggregate``: per-seed scores into ``results.json`` (means, normalisation, comparisons);
  ``results_json``: reading and writing that file.
- ``statistics``, ``comparisons``: paired two-level bootstrap intervals and verdicts.
- ``core_stability``: each task's core overlap across seeds and probe lengths against chance.
- ``report``, ``plots``: ``results.md`` and its PNG plots.
- ``sweep``: a grid of one or two knobs, one workdir per cell; ``regime_map``: the paired
  comparisons per cell, their table and heat maps.
- ``workdir``: stage markers and config checks of a pipeline's working directory.
- ``console``: what a long job prints: its own progress, library logs at WARNING.
- ``demo``: a self-contained walk through CPI-FT on a tiny model.
"""
