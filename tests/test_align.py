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


# ----------------------------------------------------------------------------- verbosity metrics


def test_verbosity_metrics_match_numpy():
    from cfpo_jax import metrics

    rng = np.random.default_rng(0)
    group = 4
    lengths = rng.integers(1, 50, 12)
    reward = 0.05 * lengths + rng.normal(0, 1, 12) + np.repeat([5.0, -3.0, 0.0], group)
    reward[8:] = 1.0  # a flat group adds nothing to the correlation
    ours = metrics.verbosity_metrics(reward, lengths, group)
    centred_r, centred_l = [], []
    for g in range(3):
        r, n = reward[g * group:(g + 1) * group], lengths[g * group:(g + 1) * group].astype(float)
        centred_r += list(r - r.mean())
        centred_l += list(n - n.mean())
    expected_corr = np.corrcoef(centred_r, centred_l)[0, 1]  # centred: corrcoef = the pooled r
    sorted_lengths = np.sort(lengths)
    position = 0.9 * (len(lengths) - 1)
    low = int(np.floor(position))
    expected_p90 = sorted_lengths[low] + (position - low) * (sorted_lengths[low + 1] - sorted_lengths[low])
    np.testing.assert_allclose(ours["reward_len_corr"], expected_corr, rtol=1e-9)
    np.testing.assert_allclose(ours["response_len_p90"], expected_p90, rtol=1e-9)
    np.testing.assert_allclose(ours["reward_per_token"], reward.sum() / lengths.sum(), rtol=1e-9)
    assert metrics.verbosity_metrics(np.ones(8), lengths[:8], group)["reward_len_corr"] == 0.0


# ----------------------------------------------------------------------------- the trainer


def tiny_config(reward_model, **rl):
    config = load_config("quickstart")
    config.model.tiny.update(hidden_size=32, intermediate_size=64)
    config.data.batch_size, config.rl.group_size = 4, 4
    config.sampling.max_new_tokens = 3
    config.rewards.fns, config.rewards.weights = (f"rm:{reward_model}",), (1.0,)
    config.rewards.rm_max_len = 64
    config.eval.sources = ()
    config.warmstart.steps = 0
    config.optim.schedule = "constant"
    config.train.tensorboard = False
    config.train.checkpoint_every = 1000
    config.rl.update(rl)
    return config


@pytest.fixture(scope="module")
def digit_reward_model(tmp_path_factory):
    return build_digit_reward_model(tmp_path_factory.mktemp("digit-rm"))


def test_reward_model_as_the_only_reward_rises(digit_reward_model, tmp_path):
    import jax

    from cfpo_jax import train

    config = tiny_config(digit_reward_model, num_epochs=2)
    config.data.batch_size = 8
    config.optim.lr = 3e-3
    config.train.num_steps = 30
    result = train.run(config, str(tmp_path), devices=jax.devices()[:1])
    name = f"reward/rm:{digit_reward_model}_mean"
    rewards_per_step = [h[name] for h in result["history"]]
    first, last = np.mean(rewards_per_step[:5]), np.mean(rewards_per_step[-5:])
    assert last - first >= 0.5, rewards_per_step  # rewards are ±1: a quarter of the responses flipped
    history = result["history"][-1]
    assert {"response_len_p90", "reward_len_corr", "reward_per_token"} <= set(history)


def test_kl_in_reward_shapes_the_rloo_advantages(digit_reward_model, tmp_path):
    """The rollout's advantages equal a numpy RLOO over reward − β·Σ_t KL_t, with the rewards
    recomputed from the sampled text and the KL from the policy's and reference's logprobs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cfpo_jax import checkpoint, metrics, models, train

    beta = 0.5
    config = tiny_config(digit_reward_model, estimator="rloo", beta=beta, kl_estimator="k3",
                         kl_in_reward=True)
    config_lib.validate(config)
    parts, state = train.build(
        config, str(tmp_path), devices=jax.devices()[:1],
        ckpt=checkpoint.Checkpointer(str(tmp_path / "ckpt"), every=1000, keep=1),
        progress=metrics.Progress(1, every=1, enabled=False))
    # A reference that differs from the policy, so that the KL is not zero.
    state["ref_params"] = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                                       state["ref_params"])
    prompts = next(parts.iterator)
    rollout = parts.rollout(state, prompts, jax.random.key(1))
    batch, device_metrics = jax.device_get(rollout.batch), rollout.device_metrics
    assert batch.ref_logp is None  # no KL loss term when the KL is in the reward

    num_new = batch.mask.shape[1]
    texts = parts.policy.tokenizer.batch_decode(
        [row[-num_new:][mask > 0] for row, mask in zip(batch.tokens, batch.mask)],
        skip_special_tokens=True)
    reward = np.array([1.0 if (t or "?")[-1] in DIGITS else -1.0 for t in texts])
    logp = {}
    for key in ("params", "ref_params"):
        model = nnx.merge(parts.policy.graphdef, state[key], parts.policy.frozen)
        logp[key] = np.asarray(models.sequence_logprobs(model, batch.tokens, batch.attn)[0])[:, -num_new:]
    log_ratio = logp["ref_params"] - logp["params"]
    kl = np.sum((np.exp(log_ratio) - log_ratio - 1) * batch.mask, axis=1)
    assert kl.min() > 0
    shaped = reward - beta * kl
    group = config.rl.group_size
    expected = np.array([shaped[i] - np.delete(shaped[i - i % group:i - i % group + group], i % group).mean()
                         for i in range(len(shaped))])
    np.testing.assert_allclose(batch.adv, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(device_metrics["kl_penalty"]), beta * kl.mean(), rtol=1e-4)
