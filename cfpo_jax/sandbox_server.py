"""The candidate's side of a verdict run, inside the sandbox: `python -I -S server.py`.

It runs the candidate's code (solution.py beside it, in /sandbox) as module "solution", then
answers calls from the verdict: each request frame on fd 3 is [name, args, kwargs] (plain data, see
sandbox_wire), each answer on fd 4 is ["ok", result] or ["raise", exception type name, message].
The first answer says whether the code itself ran: ["ok", None] or ["raise", ...].

Nothing here is trusted: the candidate's code runs in this process and may replace any of it.
The verdict decodes only plain data and runs the test's assertions in its own process.
"""

import os
import sys
import types

_BOX = os.path.dirname(os.path.abspath(__file__))  # /sandbox ("plain" isolation: elsewhere)
sys.path.insert(0, _BOX)
import wire  # noqa: E402  (sandbox_wire.py, beside this file)

REQUESTS, ANSWERS = 3, 4
_CAP = 64 << 20


def _answer(payload):
    try:
        frame = wire.encode(payload)
    except (wire.WireError, RecursionError) as e:
        frame = wire.encode(["raise", "TypeError", f"the result is not plain data: {e}"])
    wire.write_frame(ANSWERS, frame)


def main():
    requests, answers = os.dup(REQUESTS), os.dup(ANSWERS)
    os.close(REQUESTS)
    os.close(ANSWERS)
    globals().update(REQUESTS=requests, ANSWERS=answers)
    # A real module: pickle (multiprocessing) finds its functions as solution.<name>; and its
    # `if __name__ == "__main__":` demo does not run.
    module = types.ModuleType("solution")
    module.__file__ = os.path.join(_BOX, "solution.py")
    sys.modules["solution"] = module
    namespace = module.__dict__
    try:
        with open(module.__file__, encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, module.__file__, "exec"), namespace)
    except BaseException as e:  # noqa: BLE001  (the candidate's failure is its answer)
        _answer(["raise", type(e).__name__, str(e)[:1000]])
        return
    _answer(["ok", None])
    while True:
        try:
            name, args, kwargs = wire.decode(wire.read_frame(REQUESTS, cap=_CAP))
        except wire.WireError:
            return  # the verdict is done (pipe closed)
        try:
            function = namespace[name]
            result = ["ok", function(*args, **kwargs)]
        except BaseException as e:  # noqa: BLE001
            result = ["raise", type(e).__name__, str(e)[:1000]]
        _answer(result)


main()
