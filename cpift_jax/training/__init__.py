"""Supervised fine-tuning: the train step and loop, evaluation, checkpoints, toy pretraining.

- ``train``: the training loop over any batch iterator, on any mesh, resumable.
- ``step``: the train step compiled once per (model, optimizer settings, freeze pattern, mesh,
  batch shape, step config): micro-batches, remat, scanned layers, bfloat16 compute.
- ``loss``: masked cross-entropy, also in vocabulary chunks.
- ``evaluate``: greedy-decoding evaluation of held-out examples.
- ``checkpoints``: Orbax parameter and bit-packed mask checkpoints; atomic JSON files.
- ``pretrain``: the toy base model, pretrained once and cached.
"""
