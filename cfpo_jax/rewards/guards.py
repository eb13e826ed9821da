"""Cheap checks that run before any symbolic work: text that would make sympy blow up scores 0 at
once instead of burning the worker's whole deadline (or its memory) first.

The length check comes first, so every later scan reads at most MAX_ANSWER_CHARS characters
(measured: under 0.1 s for the whole hostile zoo of tests/unit/rewards/test_rewards.py). The limits sit far above every gold answer of MATH-500 (at most 53
characters, brace depth 2, exponents of at most 2 digits, no nested exponent) and far below what
costs seconds: measured with math-verify on the 2-core CPU box, `9^{9^{9}}`, `(x+1)^{10000}`,
`1000000!`, `\\binom{10^{9}}{10^{5}}`, `\\prod_{k=1}^{10^{6}} k` and 3000 nested parentheses each
ran past 20 s; 200 nested `\\frac` took 7 s, a 100k-character product of 20-digit numbers 16 s.

The worker pool's deadline and address-space limit stay the real bound; these checks only make
the common blow-ups free.
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 1000  # the text handed to math-verify (a box's content, or a completion's tail)
MAX_NESTING = 12  # {}, (), [] and \left/\right together
MAX_EXPONENT = 10_000  # the largest integer in an exponent of a number (2^{2010} is cheap)
MAX_SYMBOLIC_EXPONENT = 100  # ... of anything with a letter: (x+1)^{1000} took 26 s to expand
MAX_FACTORIAL = 10_000  # n! and n!! of a number; a symbolic (n+1)! stays allowed
MAX_BINOMIAL = 10_000  # integers in \binom / \choose arguments
# \sum and \prod bounds need no rule of their own: a bound above MAX_EXPONENT or a computed one
# (`^{10^{6}}`) is already an exponent the checks above reject.

_OPEN, _CLOSE = "{([", "})]"
_INTEGER = re.compile(r"\d+")
_LETTER = re.compile(r"(?<!\\)\b[A-Za-z]|\\(?:pi|alpha|beta|gamma|theta|phi)\b")


def _group_end(text: str, start: int, *, digit_run: bool = True) -> int:
    """Index just past the bracket group opening at `start`, else past one token: a command, a
    run of digits (`digit_run`) or one character."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        return start
    if text[start] in _OPEN:
        depth = 0
        for j in range(start, len(text)):
            if text[j] in _OPEN:
                depth += 1
            elif text[j] in _CLOSE:
                depth -= 1
                if depth == 0:
                    return j + 1
        return len(text)
    if text[start] == "\\":  # a command such as \pi
        match = re.match(r"\\[A-Za-z]+", text[start:])
        return start + (len(match.group(0)) if match else 2)
    match = _INTEGER.match(text, start)
    return match.end() if match and digit_run else start + 1


def _operand_before(text: str, end: int) -> str:
    """The bracket group or token that ends at `end` (what a `^` or `!` applies to)."""
    head = text[:end].rstrip()
    if not head:
        return ""
    if head[-1] in _CLOSE:
        depth = 0
        for j in range(len(head) - 1, -1, -1):
            depth += head[j] in _CLOSE
            depth -= head[j] in _OPEN
            if depth == 0:
                return head[j:]
        return head
    match = re.search(r"(?:\d+|\\?[A-Za-z]+|.)$", head)
    return match.group(0)


def _integers_above(text: str, limit: int) -> bool:
    return any(len(m) > len(str(limit)) or int(m) > limit for m in _INTEGER.findall(text))


def _is_symbolic(operand: str) -> bool:
    return bool(_LETTER.search(operand.replace("\\left", "").replace("\\right", "")))


def too_costly(text: str) -> str | None:
    """Why `text` is not worth a symbolic comparison (a short reason), or None when it is.

    text: what would be parsed — a `\\boxed{}` content or the tail of a completion. After the
    length check every scan below is over at most MAX_ANSWER_CHARS characters.
    """
    if len(text) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    depth = 0
    for char in text:
        if char in _OPEN:
            depth += 1
            if depth > MAX_NESTING:
                return f"nested deeper than {MAX_NESTING}"
        elif char in _CLOSE:
            depth = max(depth - 1, 0)
    for match in re.finditer(r"\^|\*\*", text):
        end = _group_end(text, match.end())
        exponent = text[match.end():end]
        if exponent.startswith("^"):  # `^^` is Asymptote code in prose, not a power
            continue
        if "^" in exponent or "**" in exponent or text[end:].lstrip().startswith(("^", "**")):
            return "a tower of exponents"
        if _integers_above(exponent, MAX_EXPONENT):
            return f"an exponent above {MAX_EXPONENT}"
        if _integers_above(exponent, MAX_SYMBOLIC_EXPONENT) and \
                _is_symbolic(_operand_before(text, match.start())):
            return f"a symbolic power above {MAX_SYMBOLIC_EXPONENT}"
    for match in re.finditer(r"(?<![\\!])!", text):
        operand = _operand_before(text, match.start())
        if _integers_above(operand, MAX_FACTORIAL) or (
                "^" in operand and not _is_symbolic(operand)):
            return f"a factorial of a number above {MAX_FACTORIAL}"
    for match in re.finditer(r"\\[dt]?binom", text):
        end = _group_end(text, _group_end(text, match.end(), digit_run=False), digit_run=False)
        arguments = text[match.end():end]
        if "^" in arguments or _integers_above(arguments, MAX_BINOMIAL):
            return f"a binomial of numbers above {MAX_BINOMIAL}"
    if "\\choose" in text and ("^" in text or _integers_above(text, MAX_BINOMIAL)):
        return f"a binomial of numbers above {MAX_BINOMIAL}"
    return None
