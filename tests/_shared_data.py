"""Where the read-only real datasets live (see ../shared/data/README.md), or a skip reason.

Order: $CFPO_SHARED_DATA, then <repo root>/../shared/data (a CI clone beside shared/), then
/work/shared/data (a git worktree nested deeper than the clone layout).
"""

import os
import pathlib

import pytest

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path | None:
    candidates = [os.environ.get("CFPO_SHARED_DATA"), _REPO_ROOT.parent / "shared" / "data",
                  "/work/shared/data"]
    for candidate in candidates:
        if candidate and pathlib.Path(candidate).is_dir():
            return pathlib.Path(candidate)
    return None


def shared_file(name: str) -> pathlib.Path:
    """Path of `name` in the shared data folder; skips the test (saying why) when absent."""
    folder = shared_data_dir()
    if folder is None or not (folder / name).is_file():
        pytest.skip(f"real data {name} not found: set CFPO_SHARED_DATA or put shared/data/ "
                    f"beside the repository root {_REPO_ROOT}")
    return folder / name
