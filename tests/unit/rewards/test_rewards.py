"""Reward functions and the scorer: real reference solutions, mutated answers, a zoo of hostile
text scored in bounded workers (time, memory, side effects), failures counted and logged."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from fractions import Fraction

import numpy as np
import pytest

from tests.fixtures import paths
from tests.fixtures.shared_data import shared_file
from cfpo_jax import rewards
from cfpo_jax.rewards import answers as answers_lib
from cfpo_jax.rewards import guards, workers


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


def memory_hog(completions, answers, **fields):
    blocks = []
    while True:  # 64 MiB at a time, touched, until the address-space limit stops it
        blocks.append(np.ones(8 << 20))


def address_space_hog(completions, answers, **fields):
    blocks = []
    while True:  # 1 GiB at a time, untouched: the address-space limit stops it at once
        blocks.append(np.empty(1 << 27))


def big_power(completions, answers, **fields):
    return np.asarray([float(9 ** (9 ** 9) % 7)], np.float32)  # one long C-level computation


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
    with rewards.Scorer(["math"], num_workers=2, timeout_s=10) as scorer:
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
    with rewards.Scorer(["gsm8k"], num_workers=2, timeout_s=10) as scorer:
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


def test_failures_score_zero_are_counted_and_first_is_logged(caplog):
    completions = ["fine", "boom 1", "fine", "boom 2"]
    with rewards.Scorer(["test_rewards:raising_reward", "test_rewards:nan_reward",
                         "test_rewards:spinning_reward"],
                        num_workers=1, timeout_s=0.3) as scorer:
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


def test_direct_calls_from_threads_agree_with_the_scorer():
    """The registered functions called directly (the shared pool) from several threads at once
    give what a Scorer gives; gold answers are real MATH-500 solutions, half of them mutated."""
    rows = _read_jsonl(shared_file("math500_test.jsonl"))[:24]
    completions = [r["solution"] for r in rows[:12]] + [
        _replace_last_box(r["solution"], _different_value(r["answer"])) for r in rows[12:]]
    golds = [r["answer"] for r in rows]
    with rewards.Scorer(["math", "format"], num_workers=2) as scorer:
        expected = scorer(completions, golds)
    direct = {}

    def score(name):
        direct[name] = rewards.get(name)(completions, golds)

    threads = [threading.Thread(target=score, args=(name,)) for name in ("math", "format")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(direct["math"], expected.per_fn["math"])
    np.testing.assert_array_equal(direct["format"], expected.per_fn["format"])
    assert direct["math"].tolist() == [1.0] * 12 + [0.0] * 12


# Each scores 0. Measured on the 2-core box without guards, every "blow-up" entry ran past 20 s
# (or 7-16 s for the nested fractions and the long product) inside math-verify.
HOSTILE = {
    "nested braces": r"\boxed{" + "{" * 20000 + "1" + "}" * 20000 + "}",
    "nested fractions": r"\boxed{" + r"\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "nested parentheses": r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    "unclosed boxes": r"\boxed{" * 30000,
    "100k characters": "1+" * 50000,
    "100k digits": r"\boxed{" + "9" * 100000 + "}",
    "long product": r"\boxed{" + "*".join(["99999999999999999999"] * 5000) + "}",
    "python code": r"\boxed{__import__('os').system('touch {tmp}/pwned_system')}",
    "open call": r"The answer is \boxed{open('{tmp}/pwned_open', 'w').write('x')}",
    "eval call": "#### eval(\"__import__('pathlib').Path('{tmp}/pwned_eval').touch()\")",
    "malformed latex": r"\boxed{\frac{1}{\left( \sqrt[}{\begin{matrix} 1 & \end{cases}}",
    "power tower": r"\boxed{9^{9^{9^{9}}}}",
    "power tower, 3": r"\boxed{2^{3^{4^{5}}}}",
    "power tower, python": r"\boxed{9**9**9}",
    "power tower, unboxed": r"so $x^{9^{9^{9}}}$",
    "huge exponent": r"\boxed{9^{999999999}}",
    "power of a power": r"\boxed{(10^{100000})^{100000}}",
    "polynomial power": r"\boxed{(x+y)^{1000}}",
    "factorial": r"\boxed{1000000!}",
    "double factorial": r"\boxed{1000000!!}",
    "factorial of a power": r"\boxed{(10^{10})!}",
    "binomial": r"\boxed{\binom{10^{9}}{10^{5}}}",
    "product": r"\boxed{\prod_{k=1}^{10^{6}} k}",
}
# Functions whose blow-ups no guard sees: the workers' deadline and memory limit catch them.
UNGUARDED = ("test_rewards:address_space_hog", "test_rewards:big_power",
             "test_rewards:spinning_reward")


def _hostile(tmp_path):
    return {name: text.replace("{tmp}", str(tmp_path)) for name, text in HOSTILE.items()}


def test_guards_reject_the_blow_ups_at_once_and_no_gold_answer():
    for name, text in HOSTILE.items():
        candidate = answers_lib.last_boxed(text)
        candidate = candidate if candidate is not None else text[-guards.MAX_ANSWER_CHARS:]
        start = time.perf_counter()
        reason = guards.too_costly(candidate)
        assert time.perf_counter() - start < 0.05, name
        if name not in ("python code", "open call", "eval call", "malformed latex",
                        "unclosed boxes", "100k characters"):  # cheap to parse (its tail)
            assert reason is not None, name
    for row in _read_jsonl(shared_file("math500_test.jsonl")):
        assert guards.too_costly(row["answer"]) is None, row["answer"]
        boxed = answers_lib.last_boxed(row["solution"])
        assert guards.too_costly(boxed) is None, boxed
    for fine in [r"2^{2010}", "(n+1)!", r"\binom{10}{3}", r"\binom52", r"x^{100}",
                 r"\cos^2 20^\circ", r"10,\!080", r"e^{i\pi}", "5!"]:
        assert guards.too_costly(fine) is None, fine


def test_hostile_completions_score_zero_in_time_without_side_effects(tmp_path):
    timeout_s = 2.0
    hostile = _hostile(tmp_path)
    with rewards.Scorer(["math", "gsm8k", "format"], num_workers=2, timeout_s=timeout_s,
                        max_memory_gb=1.0) as scorer:
        scorer(["warm up"], ["3"])
        for name, completion in hostile.items():
            start = time.monotonic()
            scores = scorer([completion], ["3"])
            elapsed = time.monotonic() - start
            assert elapsed < timeout_s + 1, (name, elapsed)
            assert scores.per_fn["math"][0] == scores.per_fn["gsm8k"][0] == 0, name
            assert scores.failures == {"math": 0, "gsm8k": 0, "format": 0}, name
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fn", UNGUARDED)
def test_unguarded_blow_ups_are_stopped_by_the_worker_limits(fn):
    """Out of memory (MemoryError at the address-space limit), a C call past the deadline
    (killed), a Python loop (the timer): each a counted 0 within timeout_s + 1 s of reaching a
    worker, which is then replaced so that the next item scores normally."""
    timeout_s = 2.0
    pool = workers.WorkerPool(1, timeout_s=timeout_s, max_memory_gb=1.0, preload=[fn, "format"])
    try:
        pool.wait_ready()
        start = time.monotonic()
        [(score, kind, message)] = pool.run([(fn, "x", "3", {})])
        assert time.monotonic() - start < timeout_s + 1, message
        assert score == 0.0 and kind in ("timeout", "killed"), message
        assert pool.run([("format", r"\boxed{3}", "3", {})]) == [(1.0, None, None)]
    finally:
        pool.close()


def test_registered_functions_called_directly_are_bounded(tmp_path):
    """`rewards.get(name)(...)` in the caller's thread: each hostile item within the default
    deadline + 1 s, 0, nothing written; the caller's memory does not grow."""
    import resource

    hostile = _hostile(tmp_path)
    rewards.get("math")(["warm up"], ["3"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("math", "gsm8k", "gsm8k_strict", "format"):
        fn = rewards.get(name)
        for case, completion in hostile.items():
            start = time.monotonic()
            value = fn([completion], ["3"])
            elapsed = time.monotonic() - start
            assert elapsed < workers.DEFAULT_TIMEOUT_S + 1, (name, case, elapsed)
            if name != "format":  # a closed box around nested braces is well-formed
                assert value.tolist() == [0.0], (name, case)
    assert list(tmp_path.iterdir()) == []
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert growth_mb < 200, growth_mb


_MEMORY_PROBE = """
import resource
from cfpo_jax.rewards import workers
pool = workers.WorkerPool(1, timeout_s=300, max_memory_gb=0.75, preload=["test_rewards:memory_hog"])
results = pool.run([("test_rewards:memory_hog", "x", "3", {})] * 2)
pool.close()
print(*[kind + ":" + message.split(" (")[0].replace(" ", "_") for _, kind, message in results],
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def test_workers_stay_under_the_memory_limit():
    """A function that allocates (and touches) memory without end hits the 0.75 GiB address-space
    limit — a MemoryError, not the machine's memory — and its worker is replaced; no worker's
    peak RSS passed the limit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), paths.ROOT]))
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], env=env, capture_output=True,
                         text=True, timeout=900, check=True).stdout.split()
    assert out[:2] == ["killed:out_of_memory"] * 2, out  # not a timeout: the limit stopped it
    peak_mb = int(out[2])
    assert 300 < peak_mb <= 768, peak_mb  # it did grow, up to the limit and no further
