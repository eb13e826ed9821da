"""Final-answer extraction from model text: the last `\\boxed{}`, GSM8K `#### n`, the last number.

Pure string scanning, linear in the input length, with no regular expression that can backtrack
on hostile text (deeply nested braces, 100k characters). Nothing here evaluates anything.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED_OPENERS = ("\\boxed", "\\fbox")
# A number as GSM8K writes it: optional sign, digits with thousands commas, optional decimals.
# Possessive-free but unambiguous: each token is consumed once, so matching stays linear.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_NUMBER_JUNK = (("{,}", ","), ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("\\!", ""),
                ("\\,", ""), (" ", ""))
_STRICT_GSM8K = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, else None.

    `\\boxed 5` (no braces, as some models write) gives "5". An unclosed last box gives None.
    """
    start = max(text.rfind(opener) for opener in _BOXED_OPENERS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def to_number(text: str) -> Fraction | None:
    """Exact value of a plain number string ("1,234", "-3.50", "$18", "72."), else None.

    LaTeX wrappers a model may put in a box (`\\$`, `\\text{}`, `\\%`, `{,}`) are stripped;
    anything else that is not a number (fractions, expressions) gives None — exact comparison
    of those is the `math` reward's job.
    """
    s = text.strip()
    for junk, replacement in _NUMBER_JUNK:
        s = s.replace(junk, replacement)
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s).strip().rstrip(".")
    if not s or len(s) > 64 or not _NUMBER.fullmatch(s):
        return None
    return Fraction(s.replace(",", ""))


def gsm8k_strict(text: str) -> Fraction | None:
    """The number after the last `####`, else None."""
    matches = _STRICT_GSM8K.findall(text)
    return to_number(matches[-1]) if matches else None


def last_number(text: str) -> Fraction | None:
    """The last number in the text, else None (the "flexible" GSM8K extraction)."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return to_number(last.group(0)) if last else None
