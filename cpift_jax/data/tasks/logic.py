"""Logical reasoning (mirrors LogiQA): a two-step syllogism applied to each digit.

``"All odd are red. All red are big. Big? 3,7,2" -> "yyn"``: a digit is "big" iff it is odd
(y/n per digit). The property words are random, so only the chain matters.
"""

DOMAIN = "logical reasoning"
TITLE = "Logic"

_WORDS = ("red", "big", "hot", "shy", "new", "wet", "far")


def answer(digits: str) -> str:
    return "".join("y" if int(d) % 2 else "n" for d in digits)


def native(digits: str, rng) -> str:
    a, b = rng.choice(len(_WORDS), size=2, replace=False)
    a, b = _WORDS[a], _WORDS[b]
    return f"All odd are {a}. All {a} are {b}. {b.capitalize()}? {','.join(digits)}"
