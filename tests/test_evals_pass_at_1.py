"""Code pass@1: program extraction, test assembly per dataset, scoring through a runner."""

import numpy as np
import pytest

from cpift_jax.data.readers import Record
from cpift_jax.evals import code, pass_at_1
from cpift_jax.data.tokenizer import CharTokenizer

HUMANEVAL = Record("HumanEval/0", [
    {"role": "user", "content": "Complete:\n```python\ndef add(a, b):\n    '''a+b'''\n```"},
    {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}],
    {"prompt": "def add(a, b):\n    '''a+b'''\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
     "entry_point": "add"})
MBPP = Record("mbpp/1", [{"role": "user", "content": "square"},
                         {"role": "assistant", "content": "..."}],
              {"tests": ["assert sq(3) == 9", "assert sq(0) == 0"], "test_setup_code": "import math"})


@pytest.mark.parametrize("reply, expected", [
    ("Here:\n```python\ndef f():\n    return 1\n```\ntrailing", "def f():\n    return 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),
    ("```py\nx = 2\n", "x = 2\n"),  # unclosed fence: to the end of the reply
    ("x = 3", "x = 3\n"),  # no fence: the reply itself
    ("```python\na = 1\n```\n```python\nb = 2\n```", "a = 1\n"),  # the first block
])
def test_extract_program(reply, expected):
    assert pass_at_1.extract_program(reply) == expected


def test_program_and_test_per_dataset():
    program, test = pass_at_1.program_and_test(HUMANEVAL, "```python\ndef add(a, b):\n    return a+b\n```")
    assert program == "def add(a, b):\n    return a+b\n"
    assert test.endswith("check(add)\n") and test.startswith("def check(f):")
    # A bare body completes the signature from the prompt.
    program, _ = pass_at_1.program_and_test(HUMANEVAL, "    return a + b")
    assert program == HUMANEVAL.meta["prompt"] + "    return a + b\n"
    program, test = pass_at_1.program_and_test(MBPP, "def sq(x):\n    return x * x")
    assert test == "import math\nassert sq(3) == 9\nassert sq(0) == 0\n"
    with pytest.raises(ValueError, match="neither 'entry_point'"):
        pass_at_1.program_and_test(Record("x", [], {}), "")


def test_score_is_the_share_of_passing_runs_with_a_recording_runner():
    tok = CharTokenizer(("code",))
    replies = {"square": "def sq(x):\n    return x * x", "cube": "def sq(x):\n    return x"}
    records = [MBPP, Record("mbpp/2", [{"role": "user", "content": "cube"},
                                       {"role": "assistant", "content": "..."}], MBPP.meta)]

    def generate_fn(config, params, prompts, lengths, max_new_tokens, *, eos_id):
        out = np.full((len(prompts), max_new_tokens), eos_id[0], np.int32)
        for b, (row, n) in enumerate(zip(np.asarray(prompts), np.asarray(lengths))):
            prompt = tok.decode(row[:n])
            ids = tok.encode(next(v for k, v in replies.items() if k in prompt))
            out[b, :len(ids)] = ids[:max_new_tokens]
        return out

    runs = []

    def runner(program, test, *, timeout_s):
        runs.append((program, test, timeout_s))
        namespace = {}
        try:
            exec(program + "\n" + test, namespace)  # trusted test programs only
        except AssertionError as err:
            return code.CodeResult(False, f"failed: {err!r}", 0.0)
        return code.CodeResult(True, "passed", 0.0)

    result = pass_at_1.evaluate(None, None, tok, records, max_new_tokens=64, batch_size=2,
                                timeout_s=3.0, generate_fn=generate_fn, runner=runner)
    assert result.passed == [True, False] and result.score == 0.5
    assert [r[2] for r in runs] == [3.0, 3.0]
    assert result.reasons[0] == "passed" and result.reasons[1].startswith("failed")


def test_refuses_without_a_sandbox(monkeypatch):
    monkeypatch.setattr(code, "sandbox_problem", lambda: "needs root (euid is 1000)")
    with pytest.raises(RuntimeError, match="sandbox cannot be built here: needs root"):
        pass_at_1.evaluate(None, None, None, [MBPP])
