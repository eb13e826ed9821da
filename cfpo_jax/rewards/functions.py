"""The built-in reward functions, as they run inside a reward worker. Each has the batch
signature of the registry:

    fn(completions: list[str], answers: list[str], **example_fields) -> np.ndarray [B] float32

They carry no timeout of their own (math-verify's `signal.alarm` timeouts are switched off here
because they would cancel the worker's timer) and are reached only through the registry, whose
functions run them in bounded workers (`cfpo_jax.rewards.workers`). A malformed gold answer
raises (the scorer counts and logs it); a malformed or hostile completion scores 0, at once when
`guards.too_costly` says so.
"""

from __future__ import annotations

import logging

import numpy as np

from cfpo_jax.rewards import answers as answers_lib
from cfpo_jax.rewards import guards

# Without a box, math-verify's extraction looks for the last expression: it gets the tail only.
FALLBACK_TAIL_CHARS = guards.MAX_ANSWER_CHARS


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; here the scorer's deadline replaces them."""

    def filter(self, record):
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _parse_gold(answer: str):
    from math_verify import parse

    # Gold answers are bare LaTeX ("\\frac{1}{2}", "\\$32,\\!348"): math-verify reads them in math mode.
    gold = parse(f"${answer}$", parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {answer!r}")
    return gold


def math_correct(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer equals `answer` under math-verify (gold first).

    The final answer is the last `\\boxed{}`; without one, math-verify's own extraction (last
    LaTeX expression, then plain expression) on the completion's last FALLBACK_TAIL_CHARS
    characters is the fallback. Text that `guards.too_costly` rejects scores 0 unparsed.
    """
    from math_verify import parse, verify

    gold = _parse_gold(answer)
    boxed = answers_lib.last_boxed(completion)
    candidate = boxed if boxed is not None else completion[-FALLBACK_TAIL_CHARS:]
    if guards.too_costly(candidate):
        return 0.0
    text = f"$\\boxed{{{boxed}}}$" if boxed is not None else candidate
    try:
        pred = parse(text, parsing_timeout=None)
        return float(bool(pred) and verify(gold, pred, timeout_seconds=None))
    except MemoryError:
        raise  # the worker must be replaced
    except Exception:  # noqa: BLE001  (sympy on malformed text: a wrong answer, not a bug)
        return 0.0


def gsm8k_correct(completion: str, answer: str, *, flexible: bool = True) -> float:
    """1.0 if the completion's number equals the gold number exactly.

    The completion's number is, in order: after the last `####` (strict), the last `\\boxed{}`
    (its value, or its last number), and — when `flexible` — the last number in the text.
    """
    gold = answers_lib.to_number(answer.split("####")[-1])
    if gold is None:
        raise ValueError(f"gsm8k gold answer {answer!r} is not a number")
    pred = _gsm8k_prediction(completion, flexible)
    return float(pred is not None and pred == gold)


def _gsm8k_prediction(completion: str, flexible: bool):
    pred = answers_lib.gsm8k_strict(completion)
    if pred is None:
        boxed = answers_lib.last_boxed(completion)
        if boxed is not None:
            pred = answers_lib.to_number(boxed)
            pred = pred if pred is not None else answers_lib.last_number(boxed)
    if pred is None and flexible:
        pred = answers_lib.last_number(completion)
    return pred


def format_ok(completion: str) -> float:
    """1.0 if the completion ends with a well-formed final answer: a closed non-empty `\\boxed{}`
    or a `#### <number>` line, else 0.0."""
    boxed = answers_lib.last_boxed(completion)
    if boxed is not None and boxed.strip():
        return 1.0
    return float(answers_lib.gsm8k_strict(completion) is not None)


def _batched(item_fn, **kwargs):
    def fn(completions: list[str], answers: list[str], **example_fields) -> np.ndarray:
        del example_fields  # the built-in rewards need only the completion and the answer
        if len(completions) != len(answers):
            raise ValueError(
                f"got {len(completions)} completions but {len(answers)} answers; they pair up"
            )
        return np.asarray([item_fn(c, a, **kwargs) for c, a in zip(completions, answers)],
                          np.float32)

    fn.__name__ = item_fn.__name__
    fn.__doc__ = item_fn.__doc__
    return fn


math_reward = _batched(math_correct)
gsm8k_reward = _batched(gsm8k_correct, flexible=True)
gsm8k_strict_reward = _batched(gsm8k_correct, flexible=False)


def _format_item(completion: str, answer: str) -> float:
    del answer  # the form of the answer is scored, not its value
    return format_ok(completion)


format_reward = _batched(_format_item)


def math_vote_key(completion: str) -> str | None:
    """What majority voting compares for `math`: the last box, spaces removed (None: no box)."""
    boxed = answers_lib.last_boxed(completion)
    return None if boxed is None or not boxed.strip() else "".join(boxed.split())


def gsm8k_vote_key(completion: str, *, flexible: bool = True) -> str | None:
    """What majority voting compares for `gsm8k`: the extracted number, exactly (None: none)."""
    pred = _gsm8k_prediction(completion, flexible)
    return None if pred is None else str(pred)
