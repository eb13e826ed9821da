"""Reward functions and the scorer: real reference solutions, mutated answers, hostile text,
main thread vs process pool, failures counted and logged."""

import json
import logging
import math
import threading
import time
from fractions import Fraction

import numpy as np
import pytest

from _shared_data import shared_file
from cfpo_jax import rewards
from cfpo_jax.rewards import answers as answers_lib
from cfpo_jax.rewards.scorer import KILL_GRACE_S


# User reward functions, importable by workers as "test_rewards:<name>".
def raising_reward(completions, answers, **fields):
    if "boom" in completions[0]:
        raise RuntimeError("boom")
    return np.ones(len(completions), np.float32)


def spinning_reward(completions, answers, **fields):
    while True:  # a pure-Python hang, interruptible by the deadline
        pass


def nan_reward(completions, answers, **fields):
    return np.full(len(completions), np.nan, np.float32)


def level_reward(completions, answers, *, level, **fields):
    return np.asarray(level, np.float32)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _replace_last_box(text, content):
    """Text with the content of its last \\boxed{...} replaced (brace matching written here)."""
    start = text.rindex("\\boxed{") + len("\\boxed{")
    depth, end = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        end += 1
    return text[:start] + content + text[end - 1:]


def _different_value(answer):
    """A value certainly different from `answer`: answer + 1 for numbers, else a number."""
    try:
        return str(Fraction(answer.replace(",", "")) + 1)
    except ValueError:
        return "-31415"


# ---------------------------------------------------------------- real data

def test_math_reward_on_math500_reference_solutions():
    rows = _read_jsonl(shared_file("math500_test.jsonl"))
    assert len(rows) == 500
    solutions = [r["solution"] for r in rows]
    golds = [r["answer"] for r in rows]
    with rewards.Scorer(["math"], num_workers=0, timeout_s=10) as scorer:
        right = scorer(solutions, golds)
        wrong = scorer([_replace_last_box(s, _different_value(a)) for s, a in zip(solutions, golds)],
                       golds)
    assert right.per_fn["math"].sum() >= 499
    assert right.failures == {"math": 0}
    assert wrong.per_fn["math"].sum() == 0


def test_gsm8k_reward_on_gsm8k_test_solutions():
    rows = _read_jsonl(shared_file("gsm8k_test.jsonl"))
    assert len(rows) == 1319
    solutions = [r["answer"] for r in rows]
    golds = [s.split("####")[-1].strip().replace(",", "") for s in solutions]
    changed = [s.rsplit("####", 1)[0] + "#### " + str(int(g) + 1) for s, g in zip(solutions, golds)]
    with rewards.Scorer(["gsm8k"], num_workers=0, timeout_s=10) as scorer:
        assert scorer(solutions, golds).per_fn["gsm8k"].sum() >= 1318
        assert scorer(changed, golds).per_fn["gsm8k"].sum() == 0


# ---------------------------------------------------------------- extraction and values

def test_last_boxed():
    assert answers_lib.last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert answers_lib.last_boxed(r"\fbox{x+1}") == "x+1"
    assert answers_lib.last_boxed(r"so \boxed 5$.") == "5"
    assert answers_lib.last_boxed(r"\boxed{1} and \boxed{2") is None
    assert answers_lib.last_boxed("no box") is None


def test_gsm8k_reward_forms():
    fn = rewards.get("gsm8k")
    strict = rewards.get("gsm8k_strict")
    completions = ["so #### 1,234", r"the answer is \boxed{1{,}234}", r"\boxed{\$1234.00}",
                   "she pays 1234 dollars.", "#### 1235", "she pays 1234 dollars, then 7."]
    golds = ["1234"] * len(completions)
    np.testing.assert_array_equal(fn(completions, golds), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(strict(completions, golds), [1, 1, 1, 0, 0, 0])
    assert fn(["half of it, #### 0.50"], ["0.5"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="not a number"):
        fn(["#### 3"], ["three"])


def test_math_reward_equivalences():
    fn = rewards.get("math")
    completions = [r"\boxed{0.5}", r"\boxed{\dfrac{1}{2}}", r"so $x = \frac12$",
                   r"\boxed{\frac{2}{3}}", r"\boxed{}"]
    np.testing.assert_array_equal(fn(completions, [r"\frac{1}{2}"] * 5), [1, 1, 1, 0, 0])


def test_format_reward():
    fn = rewards.get("format")
    np.testing.assert_array_equal(
        fn([r"\boxed{3}", "#### 3", r"\boxed{", r"\boxed{ }", "3"], [""] * 5), [1, 1, 0, 0, 0])


def test_registry_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown reward function 'nope'.*'format'.*'math'"):
        rewards.get("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        rewards.get("no_such_module:fn")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        rewards.get("test_rewards:missing")
    assert rewards.get("test_rewards:raising_reward") is raising_reward
    with pytest.raises(ValueError, match="weights"):
        rewards.Scorer(["math", "format"], [1.0])


# ---------------------------------------------------------------- scorer

def test_weighted_combination_reported_per_function():
    completions = [r"\boxed{4}", r"\boxed{5}", "4"]
    with rewards.Scorer(["math", "format", "test_rewards:level_reward"], [1.0, 0.1, 0.5]) as scorer:
        scores = scorer(completions, ["4", "4", "4"], level=[1, 2, 3])
    np.testing.assert_array_equal(scores.per_fn["math"], [1, 0, 1])
    np.testing.assert_array_equal(scores.per_fn["format"], [1, 1, 0])
    np.testing.assert_array_equal(scores.per_fn["test_rewards:level_reward"], [1, 2, 3])
    np.testing.assert_allclose(scores.total_B, [1.6, 1.1, 2.5], rtol=1e-6)
    assert scores.total_B.dtype == np.float32
    metrics = scores.metrics()
    assert metrics["reward/format_mean"] == pytest.approx(2 / 3)
    assert metrics["reward/math_failures"] == 0
    assert metrics["reward_mean"] == pytest.approx(np.mean([1.6, 1.1, 2.5]))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_failures_score_zero_are_counted_and_first_is_logged(num_workers, caplog):
    completions = ["fine", "boom 1", "fine", "boom 2"]
    with rewards.Scorer(["test_rewards:raising_reward", "test_rewards:nan_reward",
                         "test_rewards:spinning_reward"],
                        num_workers=num_workers, timeout_s=0.3) as scorer:
        with caplog.at_level(logging.WARNING):
            scores = scorer(completions, ["a"] * 4)
    np.testing.assert_array_equal(scores.per_fn["test_rewards:raising_reward"], [1, 0, 1, 0])
    assert scores.failures == {"test_rewards:raising_reward": 2, "test_rewards:nan_reward": 4,
                               "test_rewards:spinning_reward": 4}
    assert scorer.failure_totals == scores.failures
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3  # the first failure of each function only
    assert "RuntimeError: boom" in logged[0] and "'boom 1'" in logged[0]
    assert "timed out after 0.3 s" in logged[2]


def test_main_thread_mode_refuses_other_threads():
    errors = []

    def score():
        try:
            rewards.Scorer(["format"])(["x"], ["y"])
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    assert errors and "num_workers > 0" in errors[0]


def test_main_thread_and_process_pool_agree():
    rows = _read_jsonl(shared_file("math500_test.jsonl"))[:60]
    completions = [r["solution"] for r in rows] + [
        _replace_last_box(r["solution"], _different_value(r["answer"])) for r in rows[:30]
    ] + [r"\boxed{" + r["answer"] + "}" for r in rows[30:]] + ["#### 3", "nothing"]
    golds = [r["answer"] for r in rows] + [r["answer"] for r in rows] + ["3", "3"]
    names = ["math", "format", "gsm8k"]
    with rewards.Scorer(names, [1.0, 0.2, 0.5], num_workers=0) as scorer:
        main = scorer(completions, golds)
    with rewards.Scorer(names, [1.0, 0.2, 0.5], num_workers=2) as scorer:
        pool = scorer(completions, golds)
    for name in names:
        np.testing.assert_array_equal(main.per_fn[name], pool.per_fn[name])
    np.testing.assert_array_equal(main.total_B, pool.total_B)
    assert 0 < main.per_fn["math"].mean() < 1


HOSTILE = {
    "nested braces": r"\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}",
    "unclosed boxes": r"\boxed{" * 30000,
    "100k characters": "1+" * 50000,
    "100k digits": r"\boxed{" + "9" * 100000 + "}",
    "python code": r"\boxed{__import__('os').system('touch {tmp}/pwned_system')}",
    "open call": r"The answer is \boxed{open('{tmp}/pwned_open', 'w').write('x')}",
    "eval call": "#### eval(\"__import__('pathlib').Path('{tmp}/pwned_eval').touch()\")",
    "malformed latex": r"\boxed{\frac{1}{\left( \sqrt[}{\begin{matrix} 1 & \end{cases}}",
    "power tower": r"\boxed{9^{9^{9^{9}}}}",
}


def test_hostile_completions_score_zero_in_time_without_side_effects(tmp_path):
    timeout_s = 2.0
    completions = [text.replace("{tmp}", str(tmp_path)) for text in HOSTILE.values()]
    with rewards.Scorer(["math", "gsm8k"], num_workers=2, timeout_s=timeout_s) as scorer:
        scorer(["warm up"], ["3"])
        for name, completion in zip(HOSTILE, completions):
            start = time.monotonic()
            scores = scorer([completion], ["3"])
            elapsed = time.monotonic() - start
            assert elapsed < timeout_s + KILL_GRACE_S + 1.5, (name, elapsed)
            assert scores.total_B[0] == 0, name
            if name == "power tower":  # killed in its worker: a counted failure, not a silent 0
                assert scores.failures["math"] == 1
    assert list(tmp_path.iterdir()) == []


# A deadline can land in JAX's gc callback, which prints and drops it; the timer's refire raises
# it again in the reward code (that is what the scorer's refire is for).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_hostile_python_level_completions_in_main_thread(tmp_path):
    """Everything but the uninterruptible power tower also returns in time in the main thread."""
    completions = [text.replace("{tmp}", str(tmp_path))
                   for name, text in HOSTILE.items() if name != "power tower"]
    start = time.monotonic()
    with rewards.Scorer(["math", "gsm8k", "format"], [1, 1, 0], timeout_s=2.0) as scorer:
        scores = scorer(completions, ["3"] * len(completions))
    assert time.monotonic() - start < 2.0 * 2 * len(completions)
    np.testing.assert_array_equal(scores.total_B, 0)
    assert list(tmp_path.iterdir()) == []
    assert math.isfinite(scores.metrics()["reward_mean"])
