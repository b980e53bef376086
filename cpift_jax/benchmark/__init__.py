"""The CPI-FT benchmark: stages chained through artifacts in a workdir, and their report.

- ``pipeline``: runs the stages (experts, cores, clusters, every method, forgetting, report).
- ``methods``: the training methods compared (CPI-FT, multi-task SFT, multi-stage SFT, merges).
- ``config_checks``: config validation, method labels and budgets.
- ``forgetting``: sequential A -> B training.
- ``aggregate``: per-seed scores into ``results.json`` (means, normalisation).
- ``report``, ``plots``: ``results.md`` and its PNG plots.
- ``sweep``: one knob over several values, one workdir each.
- ``workdir``: stage markers and config checks of a pipeline's working directory.
- ``console``: what a long job prints: its own progress, library logs at WARNING.
- ``demo``: a self-contained walk through CPI-FT on a tiny model.
"""
