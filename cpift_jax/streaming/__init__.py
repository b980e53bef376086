"""Merging checkpoints bigger than memory, one tensor name at a time.

- ``merge``: the streaming merge (``merge_checkpoints``, ``merge_from_config``).
- ``plan``: what a streaming merge will do, decided before any tensor is read.
- ``checkpoint_io``: one interface over Hugging Face checkpoint directories (single file or
  sharded with an index) and Orbax parameter checkpoints, plus the side files (config.json,
  tokenizer) a merged Hugging Face directory needs.
- The safetensors format itself (read with ``pread``, no mmap, any dtype including bfloat16;
  written shard by shard as tensors arrive) is ``cpift_jax.models.safetensors_io``, shared
  with ``cpift_jax.models.hf.save``.
- ``host_buffers``, ``direct_write``: reused aligned host buffers and ``O_DIRECT`` writes.
"""

from cpift_jax.streaming.merge import MergeResult, merge_checkpoints, merge_from_config

__all__ = ["MergeResult", "merge_checkpoints", "merge_from_config"]
