"""Every config in configs/ loads and validates with each of its arguments, through the same flag
parser as the command line: the default, every argument its `get_config` names as valid, and
every launch command written in its docstring (with that command's overrides)."""

import ast
import glob
import os
import re
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from cfpo_jax import config as config_lib
from tests.fixtures import paths

REPO_ROOT = paths.ROOT
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))
_BOGUS = "__no_such_argument__"


def _load_module(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_commands(path):
    """The `--config...` flags of each command in the docstring that names this file."""
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    name = os.path.basename(path)
    commands = []
    for line in doc.replace("\\\n", " ").splitlines():
        if f"configs/{name}" not in line:
            continue
        tokens = [t for t in shlex.split(line.replace('"', " "), comments=True)
                  if t.startswith("--config")]
        tokens = [t for t in tokens if not t.startswith("--config.eval.checkpoint")]
        commands.append(tuple(tokens))
    return commands


def _argument_lists(path):
    """Each argv to try: the default, each valid argument, each documented command."""
    module = _load_module(path)
    relative = os.path.relpath(path, REPO_ROOT)
    argvs = {(f"--config={relative}",)}
    try:
        module.get_config(_BOGUS)
    except TypeError:  # get_config() takes no argument
        pass
    except ValueError as e:  # "valid: [...]" lists the arguments the file accepts
        match = re.search(r"valid: (\[.*?\])", str(e))
        assert match, f"{relative}: get_config({_BOGUS!r}) should name the valid arguments: {e}"
        argvs |= {(f"--config={relative}:{arg}",) for arg in ast.literal_eval(match.group(1))}
    argvs |= set(_documented_commands(path))
    return sorted(argvs)


CASES = [(os.path.relpath(path, REPO_ROOT), argv) for path in CONFIG_FILES
         for argv in _argument_lists(path)]


def test_every_config_file_is_covered():
    assert {case[0] for case in CASES} == {os.path.relpath(p, REPO_ROOT) for p in CONFIG_FILES}
    assert len(CONFIG_FILES) >= 3


@pytest.mark.parametrize("path,argv", CASES, ids=[" ".join(argv) for _, argv in CASES])
def test_config_loads_and_validates(path, argv, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the commands name configs/ relative to the repository
    monkeypatch.setattr(sys, "argv", ["prog", *argv])  # config_flags reads overrides from it
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                             lock_config=True)
    flag_values(["prog", *argv])
    config_lib.validate(holder.value)


def test_validation_names_each_bad_value(tmp_path):
    config = config_lib.base_config()
    config.model.path = "tiny"
    config.data.source = f"jsonl:{tmp_path}/none.jsonl"
    config.eval.sources = ("csv:x", "synthetic:algebra", "synthetic:arithmetic")
    config.eval.num_samples, config.eval.ks = 4, (1, 8)
    config.rewards.fns, config.rewards.weights = ("math", "no_such_module:fn", "nope"), (1, 1, 1)
    config.rewards.num_workers = 0
    config.data.synthetic.ops = "/"
    config.mesh.dcn = 0
    with pytest.raises(ValueError) as error:
        config_lib.validate(config)
    message = str(error.value)
    for problem in [f"data.source: data source 'jsonl:{tmp_path}/none.jsonl': no file",
                    "eval.sources: data source 'csv:x' must be one of",
                    "unknown synthetic task 'algebra'",
                    "eval.ks (1, 8): each k must be in 1..eval.num_samples=4",
                    "cannot import module 'no_such_module'",
                    "unknown reward function 'nope'",
                    "rewards.num_workers must be >= 1",
                    "valid operations are '+', '-', '*'",
                    "mesh.dcn (slices) must be >= 1; got 0"]:
        assert problem in message, (problem, message)
