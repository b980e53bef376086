"""Evaluation metrics, one module per kind of metric.

- ``code``: pass@1 by running a generated program against its tests in a sandbox
  (``cpift_jax.evals.code.run``); only used when the user opts in
  (``--config.eval.allow_code_execution``).
- ``math`` (to come): greedy generation, final-number extraction, exact match.
- ``multiple_choice`` (to come): option log-likelihoods (raw and length-normalised), accuracy.
- ``judge`` (to come): an MT-Bench style 1-10 judge prompt and score parser for a local model.

See docs/evaluation.md.
"""
