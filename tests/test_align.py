"""The alignment setting (issue 14): its config, a reward model as the only reward in the trainer,
KL in the reward, verbosity metrics."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

import hf_fixtures
from cfpo_jax import config as config_lib
from cfpo_jax import rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "0123456789"


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_align_config_is_the_papers_setting():
    config = load_config("align_llama")
    config_lib.validate(config)
    rl = config.rl
    assert (rl.estimator, rl.beta, rl.kl_in_reward, rl.objective) == ("rloo", 1e-4, True, "cfpo")
    assert config.rewards.fns[0].startswith("rm:")
    # the clipped baseline is one override away
    config.rl.objective = "ppo"
    config_lib.validate(config)


def build_digit_reward_model(directory) -> str:
    """A tiny Llama reward model whose reward is +1 when the text ends in a digit, else −1.

    Attention and MLP outputs are zero, so the last hidden state is the (normalised) embedding of
    the last token; digits embed as +1s, everything else as −1s, and the score head averages.
    The reward model's chat template writes the bare contents, so the last token is the
    completion's last character."""
    directory = hf_fixtures.build_checkpoint("llama", directory, num_labels=1, num_hidden_layers=1)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    digit_ids = tokenizer.convert_tokens_to_ids(list(DIGITS))
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
        embedding = model.model.embed_tokens.weight
        embedding.fill_(-1.0)
        embedding[digit_ids] = 1.0
        model.score.weight.fill_(1.0 / hidden)
    model.save_pretrained(directory)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


def test_digit_reward_model_scores_the_last_character(tmp_path):
    name = f"rm:{build_digit_reward_model(tmp_path)}"
    completions = ["12", "1a", "x9", "", "no digits"]
    with rewards.Scorer((name,)) as scorer:
        scores = scorer(completions, [""] * 5, prompt_messages=[[{"role": "user", "content": "Q?"}]] * 5)
    expected = [1.0 if (c or "?")[-1] in DIGITS else -1.0 for c in completions]
    np.testing.assert_allclose(scores.per_fn[name], expected, atol=1e-5)
