"""Instruction following (mirrors Alpaca): a string transformation named in the instruction.

``"Sort the digits: 372" -> "237"`` (ascending), with the instruction worded several ways.
"""

DOMAIN = "instruction following"
TITLE = "Instruction"

_FORMS = (
    "Sort the digits: {}",
    "Put {} in order.",
    "Arrange {} from low to high.",
    "Write {} sorted ascending.",
)


def answer(digits: str) -> str:
    return "".join(sorted(digits))


def native(digits: str, rng) -> str:
    return _FORMS[rng.integers(len(_FORMS))].format(digits)
