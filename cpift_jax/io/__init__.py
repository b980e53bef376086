"""Reading and writing checkpoints tensor by tensor (for merges bigger than memory).

- ``safetensors_io``: the safetensors file format read with ``pread`` (no mmap, any dtype
  including bfloat16) and written shard by shard as tensors arrive.
- ``checkpoints``: one interface over Hugging Face checkpoint directories (single file or
  sharded with an index) and our Orbax parameter checkpoints, plus the side files
  (config.json, tokenizer) a merged Hugging Face directory needs.
"""
