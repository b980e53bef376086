"""Math word problems (mirrors GSM8K): a running total told as a short story.

``"Ann has 3 pens, buys 7, finds 2. How many?" -> "12"`` (the sum of the digits).
"""

DOMAIN = "math word problems"
TITLE = "Math"

_NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Ivy")
_ITEMS = ("pens", "eggs", "cups", "cats", "hats", "keys")
_VERBS = ("buys", "finds", "gets", "wins")


def answer(digits: str) -> str:
    return str(sum(int(d) for d in digits))


def native(digits: str, rng) -> str:
    name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
    steps = "".join(f", {_VERBS[rng.integers(len(_VERBS))]} {d}" for d in digits[1:])
    return f"{name} has {digits[0]} {item}{steps}. How many?"
