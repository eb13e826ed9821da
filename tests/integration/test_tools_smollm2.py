"""configs/tools_smollm2.py's warm start: its target for a synthetic row is exactly the tool call
a person would write, with no EOS (the call ends the turn), and the environment answers that call
with the product; the default target is the bare answer followed by EOS. (The config's
validation and launch commands are tested with every config in test_configs.py; the measured
run itself takes 7½ minutes on 2 idle cores and is not repeated here.)"""

import importlib.util
import os

from cfpo_jax import data, tiny, warmstart
from cfpo_jax.envs import environment, formats
from cfpo_jax.envs import tools as tools_lib
from tests.fixtures import paths

ROOT = paths.ROOT


def _config():
    spec = importlib.util.spec_from_file_location(
        "tools_smollm2", os.path.join(ROOT, "configs", "tools_smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


EXAMPLE = {"question": "What is 347 * 28?", "answer": "9716", "expression": "347 * 28"}


def test_tool_call_target_is_the_call_without_eos():
    config = _config()
    tokenizer = tiny.build_tokenizer()  # one token per character: the ids spell the text
    ids = warmstart.target_ids(EXAMPLE, config.warmstart.target, tokenizer,
                               eos_id=tokenizer.eos_token_id,
                               stop_strings=formats.stop_strings(config.env.format), max_tokens=64)
    assert tokenizer.decode(ids) == "<tool>print(347 * 28)</tool>"
    assert len(ids) == len("<tool>print(347 * 28)</tool>")  # no EOS after the call


def test_answer_target_ends_with_eos_and_is_cut_to_fit():
    tokenizer = tiny.build_tokenizer()
    eos = tokenizer.eos_token_id
    ids = warmstart.target_ids(EXAMPLE, "{answer}", tokenizer, eos_id=eos, max_tokens=64)
    assert ids[-1] == eos and tokenizer.decode(ids[:-1]) == "9716"
    cut = warmstart.target_ids(EXAMPLE, "{answer}", tokenizer, eos_id=eos, max_tokens=3)
    assert cut[-1] == eos and tokenizer.decode(cut[:-1]) == "97"


def test_the_environment_answers_the_target_call_with_the_product():
    config = _config()
    row = data.load(config.data.source, synthetic=config.data.synthetic, seed=3)[0]
    text = config.warmstart.target.format(**row)
    calls = formats.parse_calls(config.env.format, text)
    assert len(calls) == 1
    tools = environment.EpisodeTools([tools_lib.get(name) for name in config.env.tools],
                                     timeout_s=config.env.tool_timeout_s,
                                     max_chars=config.env.max_observation_chars)
    answer = environment.get(config.env.name)(row, tools).step(environment.Turn(1, text, tuple(calls)))
    assert [m.role for m in answer] == ["tool"]
    a, b = (int(x) for x in row["expression"].split(" * "))
    assert answer[0].content.strip() == str(a * b) == row["answer"]
