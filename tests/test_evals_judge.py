"""The MT-Bench style judge: prompt, score parser, and no number without a judge."""

import pytest

from cpift_jax.data.readers import Record
from cpift_jax.evals import judge

RECORDS = [Record("a", [{"role": "user", "content": "Name a prime."},
                        {"role": "assistant", "content": "7"}]),
           Record("b", [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye?"},
                        {"role": "assistant", "content": "bye"}])]


@pytest.mark.parametrize("reply, expected", [
    ("Clear and correct. [[7]]", 7.0),
    ("Rating: 7", 7.0),
    ("rating = 8/10", 8.0),
    ("Rating: **9**", 9.0),
    ("Following the format [[5]] ... my verdict: [[ 3 ]]", 3.0),
    ("[[8.5]]", 8.5),
    ("[[10]]", 10.0),
    ("[[0]]", None),
    ("[[11]]", None),
    ("I would give it a seven.", None),
    ("", None),
])
def test_parse_score(reply, expected):
    assert judge.parse_score(reply) == expected


def test_prompt_holds_question_answer_and_optional_reference():
    plain = judge.judge_prompt("Name a prime.", "9")
    assert "Name a prime." in plain and "9" in plain and "[[N]]" in plain
    assert "Reference answer" not in plain and "reference" not in plain
    referenced = judge.judge_prompt("Name a prime.", "9", reference="7")
    assert "### Reference answer\n7\n" in referenced
    assert "comparing it with the reference" in referenced
    assert judge.question_text(RECORDS[0].messages) == "Name a prime."
    assert judge.question_text(RECORDS[1].messages) == "User: hi\n\nAssistant: hello\n\nUser: bye?"


def test_no_judge_reports_no_number():
    result = judge.judge_scores(RECORDS, ["11", "ciao"])
    assert not result.configured and result.message == "no judge configured"
    assert result.mean is None and result.scores == [] and result.parsed == 0
    assert result.summary()["judge"] == "no judge configured"


def test_a_callable_judge_is_scored_and_unparseable_replies_are_counted():
    prompts = []

    def fake_judge(prompt):
        prompts.append(prompt)
        return "Fine. [[8]]" if "Name a prime." in prompt else "no verdict"

    result = judge.judge_scores(RECORDS, ["11", "ciao"], fake_judge, use_reference=True)
    assert result.configured and result.scores == [8.0, None]
    assert result.mean == 8.0 and result.parsed == 1 and result.unparsed == 1
    assert result.replies == ["Fine. [[8]]", "no verdict"]
    assert "### Reference answer\n7\n" in prompts[0] and "### Reference answer\nbye\n" in prompts[1]
    silent = judge.judge_scores(RECORDS, ["11", "ciao"], lambda p: "no verdict")
    assert silent.configured and silent.mean is None and silent.unparsed == 2
    with pytest.raises(ValueError, match="2 records but 1 answers"):
        judge.judge_scores(RECORDS, ["x"], fake_judge)
