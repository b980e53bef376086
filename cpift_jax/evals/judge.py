"""An MT-Bench style judge for open-ended answers: a 1-10 grading prompt and its score parser.

Single-answer grading as in Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena": a judge model reads the question, the answer and optionally a reference answer,
explains its verdict and ends with the rating written as ``[[N]]``. A judge is any callable
``prompt (str) -> reply (str)``, e.g. a local model wrapped by the user; nothing here reaches a
network or picks a model.

``parse_score`` reads the rating: the last ``[[N]]`` in the reply, else the last ``Rating: N``
(``N`` an integer or a decimal, optionally followed by ``/10``); a rating outside 1-10 or a reply
with neither is unparseable (None). With no judge configured, ``judge_scores`` says so and
reports no number.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

__all__ = ["NO_JUDGE", "JUDGE_TEMPLATE", "REFERENCE_BLOCK", "JudgeResult", "question_text",
           "judge_prompt", "parse_score", "judge_scores"]

NO_JUDGE = "no judge configured"

JUDGE_TEMPLATE = (
    "You are grading the reply of an AI assistant to a user. Judge how helpful, correct, "
    "relevant, deep and clearly written it is{reference_clause}. Write a brief justification "
    "first, staying impartial and ignoring the reply's length as such. Finish with your grade on "
    "a scale from 1 (worst) to 10 (best) in exactly this form: [[N]], for example [[6]].\n\n"
    "### User question\n{question}\n\n"
    "{reference_block}"
    "### Assistant reply (start)\n{answer}\n### Assistant reply (end)\n"
)
REFERENCE_BLOCK = "### Reference answer\n{reference}\n\n"
_REFERENCE_CLAUSE = ", comparing it with the reference answer given below"

_BRACKETED = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING = re.compile(r"rating\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)(?:\s*/\s*10)?", re.IGNORECASE)


def question_text(messages: Sequence[dict]) -> str:
    """What the judge is shown as the question: the conversation before its last assistant turn
    (a single user turn as is; several turns as a ``User:`` / ``Assistant:`` transcript)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
               default=len(messages))
    shown = [m for m in messages[:last] if m["role"] != "system"]
    if not shown:
        raise ValueError("the conversation has no turn before its answer to judge")
    if len(shown) == 1:
        return shown[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in shown)


def judge_prompt(question: str, answer: str, reference: str | None = None) -> str:
    """The grading prompt (``JUDGE_TEMPLATE``), with the reference block when given."""
    return JUDGE_TEMPLATE.format(
        question=question, answer=answer,
        reference_clause=_REFERENCE_CLAUSE if reference is not None else "",
        reference_block=REFERENCE_BLOCK.format(reference=reference) if reference is not None
        else "")


def parse_score(reply: str) -> float | None:
    """The 1-10 rating in a judge's reply (module doc); None when there is no valid one."""
    found = _BRACKETED.findall(reply) or _RATING.findall(reply)
    if not found:
        return None
    score = float(found[-1])
    return score if 1.0 <= score <= 10.0 else None


@dataclasses.dataclass(frozen=True)
class JudgeResult:
    """``configured`` False: no judge ran, ``mean`` is None and ``message`` says why. Otherwise
    ``scores`` per answer (None: unparseable reply), ``mean`` over the parsed ones (None when
    none parsed) and the judge's raw ``replies``."""

    configured: bool
    message: str
    mean: float | None
    parsed: int
    unparsed: int
    scores: list[float | None]
    replies: list[str]

    def summary(self) -> dict:
        return {"judge_mean": self.mean, "judge_parsed": self.parsed,
                "judge_unparsed": self.unparsed, "judge": self.message}


def judge_scores(records: Sequence, answers: Sequence[str],
                 judge: Callable[[str], str] | None = None, *,
                 use_reference: bool = False) -> JudgeResult:
    """Grades each answer to its record's question with ``judge`` (module doc).

    ``use_reference``: show the record's last assistant turn as the reference answer (MT-Bench
    does so for math, reasoning and coding questions).
    """
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} records but {len(answers)} answers")
    if judge is None:
        return JudgeResult(False, NO_JUDGE, None, 0, 0, [], [])
    replies, scores = [], []
    for record, answer in zip(records, answers):
        reference = None
        if use_reference:
            turns = [m for m in record.messages if m["role"] == "assistant"]
            if not turns:
                raise ValueError(f"record {record.id!r}: use_reference needs an assistant turn")
            reference = turns[-1]["content"]
        reply = judge(judge_prompt(question_text(record.messages), answer, reference))
        if not isinstance(reply, str):
            raise TypeError(f"the judge must return a string, got {type(reply).__name__} for "
                            f"record {record.id!r}")
        replies.append(reply)
        scores.append(parse_score(reply))
    parsed = [s for s in scores if s is not None]
    mean = sum(parsed) / len(parsed) if parsed else None
    message = (f"judged {len(parsed)} of {len(scores)} answers" if parsed
               else f"the judge gave no parseable rating for any of {len(scores)} answers")
    return JudgeResult(True, message, mean, len(parsed), len(scores) - len(parsed), scores,
                       replies)
