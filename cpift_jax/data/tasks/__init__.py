"""Synthetic tasks, one per module, looked up by module name (like ``cpift_jax.merges``).

Every task maps the same kind of *payload*, a short string of decimal digits, to an answer by
its own rule, and dresses the payload in a prompt of its domain (one of the five SFT domains of
arXiv 2508.21741, Sec. 4: math word problems, code, logical reasoning, instruction following,
multi-turn chat). A task module defines:

* ``DOMAIN``: the paper domain it mirrors; ``TITLE``: instruction words used by the strong tag;
* ``answer(digits) -> str``: the rule;
* ``native(digits, rng) -> str``: the domain-styled prompt (``rng``: a numpy Generator for the
  decoration: names, variable names, wording; never for the answer).

Because every rule reads the same payload, a *bare* prompt (the digits alone) is the same input
for all tasks with different answers: the ``similarity`` knob of ``cpift_jax.data.suite`` mixes
bare prompts in to create that interference on purpose.
"""

from __future__ import annotations

from cpift_jax import registry

__all__ = ["available", "get_module", "DEFAULT_TASKS"]

# One task per paper domain, in the paper's order (GSM8K, CodeAlpaca, LogiQA, Alpaca, UltraChat).
DEFAULT_TASKS = ("arith", "program", "logic", "strings", "recall")


def available() -> list[str]:
    """Sorted names of every task module in this package."""
    return registry.names(__path__)


def get_module(name: str):
    """The task's module; an unknown name raises ValueError listing the tasks."""
    return registry.load(__name__, __path__, name, kind="task",
                         required=("DOMAIN", "TITLE", "answer", "native"))
