"""Multi-turn chat (mirrors UltraChat): recall a fact the user gave in an earlier turn.

``"U:my pin is 372.A:ok.U:my age is 48.A:ok.U:my pin?A:" -> "372"``: two facts in random
order, the question asks for the one holding the payload; the other is a random distractor.
"""

DOMAIN = "multi-turn chat"
TITLE = "Chat"

_KEYS = ("pin", "age", "room", "code", "bus", "seat")


def answer(digits: str) -> str:
    return digits


def native(digits: str, rng) -> str:
    key, other = rng.choice(len(_KEYS), size=2, replace=False)
    key, other = _KEYS[key], _KEYS[other]
    distractor = "".join(str(d) for d in rng.integers(10, size=len(digits)))
    facts = [(key, digits), (other, distractor)]
    if rng.integers(2):
        facts.reverse()
    turns = "".join(f"U:my {k} is {v}.A:ok." for k, v in facts)
    return f"{turns}U:my {key}?A:"
