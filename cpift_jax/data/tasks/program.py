"""Code (mirrors CodeAlpaca): predict what a tiny Python program prints.

``"s='372'\\nprint(s[::-1])" -> "273"`` (the digits reversed), written in one of a few
equivalent spellings.
"""

DOMAIN = "code"
TITLE = "Code"

_VARS = ("s", "x", "w", "t", "a")


def answer(digits: str) -> str:
    return digits[::-1]


def native(digits: str, rng) -> str:
    v = _VARS[rng.integers(len(_VARS))]
    forms = (
        f"{v}='{digits}'\nprint({v}[::-1])",
        f"print('{digits}'[::-1])",
        f"{v}='{digits}';r={v}[::-1];print(r)",
    )
    return forms[rng.integers(len(forms))]
