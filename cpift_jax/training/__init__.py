"""Supervised fine-tuning: the train step and loop, evaluation, checkpoints, toy pretraining.

- ``train``: the jitted train step and the loop over any batch iterator.
- ``evaluate``: greedy-decoding evaluation of held-out examples.
- ``checkpoints``: Orbax parameter and bit-packed mask checkpoints; atomic JSON files.
- ``pretrain``: the toy base model, pretrained once and cached.
"""
