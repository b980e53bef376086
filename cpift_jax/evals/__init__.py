"""Evaluation metrics, one module per kind of metric.

Each metric is a pure function over ``(model_config, params, tokenizer, records)`` (records from
``cpift_jax.data.readers``), batched with one compiled program per shape, on whatever sharding
the parameters carry.

- ``math``: greedy generation (KV cache) of each problem's reply, final-number extraction
  (``#### N``, else the last number), exact match (``math.evaluate``).
- ``multiple_choice``: option log-likelihoods, accuracy raw, per character and per token
  (``multiple_choice.evaluate``); letter answers from generation
  (``multiple_choice.evaluate_letters``).
- ``heldout``: held-out loss and bits per byte on reference answers (``heldout.evaluate``), the
  metric for open-ended tasks and for code without the execution opt-in.
- ``code``: pass@1 by running a generated program against its tests in a sandbox
  (``cpift_jax.evals.code.run``); only used when the user opts in
  (``--config.eval.allow_code_execution``).
- ``judge``: an MT-Bench style 1-10 judge prompt and score parser for any callable judge
  (``judge.judge_scores``); without a judge it reports "no judge configured", never a number.

See docs/evaluation.md.
"""
