"""Code pass@1: greedy generation, program extraction, sandboxed execution against the tests.

Each record (``cpift_jax.data.readers.Record`` from the ``mbpp`` or ``humaneval`` reader) is
prompted with its conversation up to its last assistant turn (``math.generate_replies``), and
one greedy reply is scored:

* the program is the first fenced code block of the reply (```` ```python ```` or a bare
  fence; an unclosed fence runs to the end of the reply), else the whole reply;
* HumanEval: when the program does not define the entry point, it is taken as a completion of
  the signature and appended to ``meta["prompt"]``; the test is ``meta["test"]`` followed by
  ``check(<entry point>)``;
* MBPP: the test is ``meta["test_setup_code"]`` and the ``assert`` lines of ``meta["tests"]``;
* the pair runs in ``cpift_jax.evals.code.run``'s sandbox; pass@1 is the share of records whose
  run passes (n = 1 sample per problem, so pass@1 is the plain mean; Chen et al. 2021, eq. 1).

Running generated code is the caller's decision: the benchmark calls this only with
``--config.eval.allow_code_execution`` (docs/evaluation.md). If the sandbox cannot be built here,
``evaluate`` raises before generating anything instead of scoring every program as failed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from cpift_jax import models
from cpift_jax.evals import code
from cpift_jax.evals import math as math_eval

__all__ = ["CodeEvalResult", "extract_program", "program_and_test", "evaluate"]

Pytree = Any

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_program(reply: str) -> str:
    """The first fenced code block of ``reply`` (module doc), else the reply itself."""
    match = _FENCE.search(reply)
    return (match.group(1) if match else reply).rstrip() + "\n"


def program_and_test(record, reply: str) -> tuple[str, str]:
    """``(program, test)`` for one record and its model reply (module doc); ValueError for a
    record that is neither MBPP nor HumanEval."""
    meta = record.meta
    program = extract_program(reply)
    if "entry_point" in meta:
        entry = meta["entry_point"]
        if not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", program, re.MULTILINE):
            program = meta["prompt"] + program
        return program, f"{meta['test']}\n\ncheck({entry})\n"
    if "tests" in meta:
        setup = meta.get("test_setup_code") or ""
        return program, setup + "\n" + "\n".join(meta["tests"]) + "\n"
    raise ValueError(f"record {record.id!r}: meta has neither 'entry_point' (HumanEval) nor "
                     "'tests' (MBPP); read it with the humaneval or mbpp reader")


@dataclasses.dataclass(frozen=True)
class CodeEvalResult:
    """``score``: pass@1; per record (input order) the reply, the program run, pass and reason."""

    score: float
    unfinished: int
    ids: list[str]
    replies: list[str]
    programs: list[str]
    passed: list[bool]
    reasons: list[str]


def evaluate(model_config: models.ModelConfig, params: Pytree, tokenizer, records: Sequence, *,
             max_new_tokens: int = 384, batch_size: int = 16, timeout_s: float = 10.0,
             eos_ids: Sequence[int] | None = None, generate_fn: Callable | None = None,
             runner: Callable = code.run) -> CodeEvalResult:
    """pass@1 of greedy replies (module doc). ``runner`` has ``code.run``'s signature (tests
    pass a recorder); with the default runner the sandbox must be available."""
    if runner is code.run and (problem := code.sandbox_problem()) is not None:
        raise RuntimeError(f"code execution was enabled but the sandbox cannot be built here: "
                           f"{problem} (docs/evaluation.md, 'What it needs')")
    for r in records:  # a record from another reader fails before any generation
        program_and_test(r, "")
    replies = math_eval.generate_replies(model_config, params, tokenizer, records,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         eos_ids=eos_ids, generate_fn=generate_fn)
    programs, passed, reasons = [], [], []
    for record, reply in zip(records, replies.texts):
        program, test = program_and_test(record, reply)
        result = runner(program, test, timeout_s=timeout_s)
        programs.append(program)
        passed.append(bool(result.passed))
        reasons.append(result.reason)
    return CodeEvalResult(score=sum(passed) / len(passed),
                          unfinished=sum(not f for f in replies.finished),
                          ids=[r.id for r in records], replies=replies.texts, programs=programs,
                          passed=passed, reasons=reasons)
