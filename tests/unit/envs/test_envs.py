"""cfpo_jax.envs: tool-call formats against hand-written transcripts, tools and their limits,
multi-turn episodes on the tiny model (token bookkeeping, logprobs, schedule independence) and a
short multi-turn training run."""

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax import data, envs, learner, models, tiny, train
from cfpo_jax.config import base_config
from cfpo_jax.envs import environment, formats, tools
from tests.fixtures import paths

ROOT = paths.ROOT

# The tool-message parts of Qwen2.5's and Llama 3.1's chat templates (as they ship in their
# tokenizer_config.json), shortened to what a conversation of user, assistant and tool messages
# uses. The expected texts below are written out by hand from the models' documented formats.
QWEN25_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA31_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}"
    "{%- else %}{{- message.content }}{%- endif %}{{- '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


class TemplateOnly:
    """Just what `formats.observation_text` uses of a tokenizer."""

    def __init__(self, template):
        self.chat_template = template
        from transformers.utils.chat_template_utils import render_jinja_template

        self._render = render_jinja_template

    def apply_chat_template(self, conversation, tokenize, add_generation_prompt):
        rendered, _ = self._render([conversation], chat_template=self.chat_template,
                                   add_generation_prompt=add_generation_prompt, bos_token="<|begin_of_text|>")
        return rendered[0]


# ----------------------------------------------------------------------------- formats


def test_tool_calls_are_read_in_each_format():
    assert formats.parse_calls("tag", "I will compute. <tool> 347*28 </tool>") == [formats.ToolCall(text="347*28")]
    hermes = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call><|im_end|>')
    assert formats.parse_calls("hermes", hermes) == [
        formats.ToolCall(name="calculator", arguments={"expression": "2*3"}),
        formats.ToolCall(name="python", arguments={"code": "print(1)"})]
    bad = formats.parse_calls("hermes", "<tool_call>{name: calculator}</tool_call>")
    assert len(bad) == 1 and bad[0].error.startswith("the tool call is not valid JSON")
    assert formats.parse_calls("llama3", "<|python_tag|>print(6 * 7)<|eom_id|>") == [
        formats.ToolCall(name="python", text="print(6 * 7)")]
    assert formats.parse_calls("llama3", '{"name": "calculator", "parameters": {"expression": "1+1"}}<|eot_id|>') == [
        formats.ToolCall(name="calculator", arguments={"expression": "1+1"})]
    assert formats.parse_calls("llama3", "The answer is 42.<|eot_id|>") == []
    assert formats.parse_calls("tag", "no call here") == []


def test_answers_are_written_in_the_models_template():
    messages = [formats.Message("tool", "42")]
    # Qwen2.5: the model ended its turn with <|im_end|>; the template's own <|im_end|> is not repeated.
    qwen = TemplateOnly(QWEN25_TEMPLATE)
    assert formats.observation_text("hermes", qwen, messages, True, ("<|im_end|>",)) == (
        "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # A turn that stopped without its EOS gets the template's end of turn as context.
    assert formats.observation_text("hermes", qwen, messages, False, ("<|im_end|>",)).startswith(
        "<|im_end|>\n<|im_start|>user\n<tool_response>")
    # Llama 3.1: after <|eom_id|> the ipython turn follows directly (its template JSON-quotes text).
    llama = TemplateOnly(LLAMA31_TEMPLATE)
    assert formats.observation_text("llama3", llama, messages, True, ("<|eot_id|>", "<|eom_id|>")) == (
        '<|start_header_id|>ipython<|end_header_id|>\n\n"42"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert formats.observation_text("tag", None, messages + [formats.Message("user", "sure?")], False, ()) == (
        "<output>\n42\n</output>\n\nsure?\n")


def test_stop_sequences_spell_the_stop_string():
    tokenizer = tiny.build_tokenizer()
    sequences = formats.stop_token_sequences(tokenizer, ["</tool>"])
    assert sequences == (tuple(tokenizer.convert_tokens_to_ids(list("</tool>"))),)


def test_chat_formats_list_the_tools_in_the_prompt():
    config = env_config("tools", format="hermes", tools=("calculator", "python"))
    schemas = envs.prompt_tools(config)
    assert [s["function"]["name"] for s in schemas] == ["calculator", "python"]
    assert schemas[0]["function"]["parameters"]["required"] == ["expression"]
    assert envs.prompt_tools(env_config("tools", format="tag")) == ()
    assert envs.prompt_tools(env_config("")) == ()
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    builder = data.PromptBuilder(tokenizer, "chat", None, "{question}", schemas)
    assert builder.text("2+2?") == "[calculator][python]2+2?"


# ----------------------------------------------------------------------------- tools


def test_calculator_is_exact_and_only_arithmetic():
    assert tools.calculator("347 * 28") == "9716"
    assert tools.calculator("(2 + 3) ** 2 - 7 // 2") == str((2 + 3) ** 2 - 7 // 2)
    assert tools.calculator("1 / 4") == "0.25"
    for bad in ("__import__('os').system('true')", "2 ** 100000", "x + 1", "9 ** 9 ** 9"):
        with pytest.raises(ValueError):
            tools.calculator(bad)


def sleepy(seconds: str) -> str:
    time.sleep(float(seconds))
    return "woke"


def test_tool_calls_are_bounded_and_never_raise():
    slow = tools.Tool("sleepy", sleepy, "seconds")
    start = time.monotonic()
    result = tools.call(slow, text="30", timeout_s=0.3, max_chars=100)
    assert result.timed_out and result.error and time.monotonic() - start < 1.0
    assert tools.call(slow, text="0", timeout_s=5, max_chars=100) == tools.ToolResult("woke", seconds=pytest.approx(0, abs=1))
    calc = tools.get("calculator")
    failed = tools.call(calc, text="1 +", timeout_s=5, max_chars=100)
    assert failed.error and not failed.timed_out and failed.text.startswith("error: ValueError")
    long = tools.call(calc, text="7 ** 60", timeout_s=5, max_chars=10)
    assert long.text.startswith(str(7 ** 60)[:10]) and "more characters cut" in long.text
    wrong_arguments = tools.call(calc, arguments={"expr": "1"}, timeout_s=5, max_chars=100)
    assert wrong_arguments.error and "TypeError" in wrong_arguments.text


def test_episode_tools_count_and_explain_failures():
    episode = environment.EpisodeTools([tools.get("calculator")], timeout_s=5, max_chars=100)
    answers = [episode.call(formats.ToolCall(text="6*7")),
               episode.call(formats.ToolCall(name="search", arguments={"q": "x"})),
               episode.call(formats.ToolCall(error="the tool call is not valid JSON (x)"))]
    assert [m.content for m in answers] == [
        "42", "error: no tool 'search'; the tools are ['calculator']", "error: the tool call is not valid JSON (x)"]
    assert (episode.calls, episode.errors, episode.timeouts) == (3, 2, 0)


def test_unknown_names_are_errors_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown tool 'calc'.*calculator"):
        tools.get("calc")
    with pytest.raises(ValueError, match="unknown environment 'tool'.*tools"):
        environment.get("tool")
    config = base_config()
    config.model.path = "tiny"
    config.env.name = "tools"
    with pytest.raises(ValueError, match="give env.tools"):
        from cfpo_jax import config as config_lib

        config_lib.validate(config)


@pytest.mark.skipif(importlib.util.find_spec("cfpo_jax.sandbox") is None,
                    reason="cfpo_jax.sandbox (issue 23 point 4) is not on this branch yet")
def test_python_tool_runs_code_in_the_sandbox():
    python = tools.get("python")
    assert tools.call(python, text="print(347 * 28)", timeout_s=20, max_chars=100).text.strip() == "9716"
    failed = tools.call(python, text="raise SystemExit(3)", timeout_s=20, max_chars=100)
    assert failed.error and not failed.timed_out


# ----------------------------------------------------------------------------- episodes on the tiny model


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    path = tiny.build(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return models.from_pretrained(path), models.load_tokenizer(path)


def env_config(name, **overrides):
    config = base_config().env
    config.name = name
    config.tools = ("calculator",)
    config.update(overrides)
    return config


def digits_end_turns(tokenizer):
    """Turn-ending ids for a random model: EOS and the ten digits (turns end within a few tokens)."""
    return (tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("0123456789")))


def test_episode_token_bookkeeping_against_a_hand_built_transcript(tiny_policy):
    """Each episode is prompt, turn 1, the calculator's answer, turn 2, feedback, turn 3 — the
    answers written by hand here; positions run on through the answers; only the turns are in
    the loss mask; the trainer's logprobs of the sampled tokens are the sampler's."""
    model, tokenizer = tiny_policy
    rollout = envs.EnvRollout(env_config("tests.fixtures.envs:CheckWithCalculator", max_turns=3), tokenizer,
                              digits_end_turns(tokenizer))
    examples = [{"question": "What is 12 * 3?"}, {"question": "What is 7 + 5?"}]
    prompts = [tokenizer(e["question"], add_special_tokens=False)["input_ids"] for e in examples]
    samples, metrics = rollout.generate(model, examples, prompts, n=2, max_new_tokens=64, temperature=1.0, seed=1)
    tokens, mask, generated = (np.asarray(x) for x in (samples.tokens, samples.mask, samples.generated))
    ends = set(digits_end_turns(tokenizer))
    answers = {0: "<output>\n36\n</output>\n", 1: "<output>\n12\n</output>\n"}
    complete = 0
    for row in range(4):
        length, row_tokens = int(samples.lengths[row]), tokens[row].tolist()
        # Rebuild the episode from its sampled turns and the hand-written answers.
        expected, expected_generated, column = [], [], 0
        for turn, answer in enumerate([answers[row // 2], "\nsure?\n", None]):
            turn_len = next((i + 1 for i, t in enumerate(row_tokens[column:length]) if t in ends), length - column)
            expected += row_tokens[column:column + turn_len]
            expected_generated += [1] * turn_len
            column += turn_len
            if column >= length or answer is None:
                break
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: length - column]
            expected += ids
            expected_generated += [0] * len(ids)
            column += len(ids)
        complete += turn == 2 and column == length
        assert row_tokens[:length] == expected, row
        assert generated[row, :length].tolist() == expected_generated, row
        assert not mask[row, length:].any() and not generated[row, length:].any()
    assert complete >= 2  # most episodes run all three turns within the budget
    assert metrics["turns_mean"] > 2 and metrics["tool_calls_mean"] >= 0.75 and metrics["tool_errors_mean"] == 0
    assert metrics["observation_tokens_mean"] == pytest.approx((mask - generated).sum() / 4)

    # The trainer's view (learner.make_prepare): one sequence per episode, positions from the
    # attention mask, which covers the answers; the loss mask covers only sampled tokens.
    rl = base_config().rl
    rl.update(dict(estimator="grpo", group_size=2, pack=False, num_epochs=2, num_minibatches=1))
    prepare = learner.make_prepare(nnx_graphdef(model), rl, temperature=1.0,
                                   pad_id=tokenizer.pad_token_id,
                                   batch_sh=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    graphdef, params, frozen = split(model)
    batch, batch_metrics = prepare(params, None, frozen, samples, jnp.arange(4, dtype=jnp.float32), None)
    width = batch.tokens.shape[1] - tokens.shape[1]
    np.testing.assert_array_equal(batch.tokens[:, width:], tokens)
    np.testing.assert_array_equal(batch.attn[:, width:], mask)
    np.testing.assert_array_equal(batch.mask, generated)
    positions = np.cumsum(np.asarray(batch.attn), axis=1) - 1
    for row in range(4):
        prompt_len = len(prompts[row // 2])
        assert positions[row, width] == prompt_len  # the first episode token follows the prompt
        assert positions[row, width + int(samples.lengths[row]) - 1] == prompt_len + int(samples.lengths[row]) - 1
    logp = np.asarray(batch.old_logp)
    np.testing.assert_allclose(np.where(generated, logp, 0), np.where(generated, samples.logprobs, 0), atol=1e-5)
    assert float(batch_metrics["sampler_logprob_gap"]) < 1e-5


def nnx_graphdef(model):
    return split(model)[0]


def split(model):
    from flax import nnx

    return nnx.split(model, nnx.Param, ...)


def test_episodes_with_tool_calls_do_not_depend_on_max_concurrent(tiny_policy):
    model, tokenizer = tiny_policy
    rollout = envs.EnvRollout(env_config("tests.fixtures.envs:derived_calls", max_turns=4, num_threads=3), tokenizer,
                              digits_end_turns(tokenizer))
    examples = [{"question": f"What is {i} + 1?"} for i in range(5)]
    prompts = [tokenizer(e["question"], add_special_tokens=False)["input_ids"] for e in examples]
    runs = {k: rollout.generate(model, examples, prompts, n=2, max_new_tokens=48, temperature=1.0, seed=3,
                                max_concurrent=k) for k in (1, 3, None)}
    reference, metrics = runs.pop(None)
    assert metrics["tool_calls_mean"] > 1.5  # several tool calls per episode
    for k, (s, m) in runs.items():
        for field in ("tokens", "mask", "generated", "eos"):
            np.testing.assert_array_equal(getattr(s, field), getattr(reference, field), err_msg=f"{field}, K={k}")
        np.testing.assert_allclose(s.logprobs, reference.logprobs, atol=1e-5)
        assert m == metrics


# ----------------------------------------------------------------------------- training


def test_multi_turn_training_run(tmp_path):
    """Two CFPO steps on tool-using episodes of the quickstart's tiny model after a short warm
    start (which teaches it to end its turns): the episodes have several turns with answered
    tool calls, the update is finite and moves the policy, and the sampler's logprobs of the
    sampled tokens are the trainer's."""
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "configs", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.batch_size, config.rl.group_size = 2, 4
    config.warmstart.steps, config.warmstart.batch_size, config.train.num_steps = 30, 16, 2
    config.train.tensorboard, config.eval.sources = False, ()
    config.sampling.max_new_tokens = 32
    config.rewards.fns = ("tests.fixtures.rewards:digit_fraction",)  # dense: advantages are not all zero
    config.env.name, config.env.tools, config.env.max_turns = "tests.fixtures.envs:CheckWithCalculator", ("calculator",), 3
    result = train.run(config, str(tmp_path), devices=jax.devices()[:1])
    history = result["history"]
    assert len(history) == 2
    for step in history:
        assert step["turns_mean"] > 1.5 and step["tool_calls_mean"] > 0.5, step
        assert step["observation_tokens_mean"] > 5 and step["tool_errors_mean"] == 0
        assert np.isfinite(step["loss"]) and step["grad_norm"] > 0
        assert step["sampler_logprob_gap"] < 1e-4, step
