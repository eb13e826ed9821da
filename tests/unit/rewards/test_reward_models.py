"""Reward models (sequence-classification checkpoints) against transformers' own classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.fixtures import hf_fixtures
from cfpo_jax import rewards, sharding
from cfpo_jax.models import from_pretrained, save_pretrained

FAMILIES = ("qwen2", "qwen3", "llama")
TOL = 1e-4
PAD_ID = 0  # hf_fixtures' <pad>; real tokens are drawn from 3..V so they never equal it


@pytest.fixture(scope="module", params=FAMILIES)
def reward_checkpoint(request, tmp_path_factory):
    family = request.param
    # llama with two labels: the reward is the first one.
    num_labels = 2 if family == "llama" else 1
    directory = hf_fixtures.build_checkpoint(family, tmp_path_factory.mktemp(f"rm-{family}"),
                                             num_labels=num_labels, seed=3)
    return family, num_labels, directory, hf_fixtures.reference_reward_model(directory)


def padded_batch(T=16, lengths=(16, 9, 12), side="left", seed=0):
    """Random tokens [B, T] with row b holding lengths[b] real tokens, padded on `side`."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), T), PAD_ID, np.int64)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        tokens[b, cols] = rng.integers(3, hf_fixtures.VOCAB_SIZE, n)
        mask[b, cols] = 1
    return tokens, mask


def reference_rewards(ref, tokens, mask):
    """transformers' pooled logits (its own last-non-pad-token rule, its own positions), label 0."""
    with torch.no_grad():
        out = ref(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask))
    return out.logits[:, 0].float().numpy()


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_reward_matches_transformers(reward_checkpoint, side):
    family, num_labels, directory, ref = reward_checkpoint
    model = from_pretrained(directory)
    assert model.config.num_labels == num_labels and model.config.model_type == family
    lengths = (16, 16, 16) if side == "none" else (16, 9, 12)
    tokens, mask = padded_batch(lengths=lengths, side="left" if side == "none" else side)
    ours = nnx.jit(lambda m, t, k: m.reward(t, k))(model, jnp.asarray(tokens, jnp.int32),
                                                   jnp.asarray(mask))
    expected = reference_rewards(ref, tokens, mask)
    assert ours.dtype == jnp.float32 and ours.shape == (3,)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)
    # The scores are not all alike, so a wrong pooled position could not pass by accident.
    assert np.ptp(expected) > 10 * TOL


def test_sharded_reward_model_equals_one_device(reward_checkpoint):
    _, _, directory, ref = reward_checkpoint
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = from_pretrained(directory, mesh=mesh)
    assert len(model.score[...].sharding.device_set) == 8
    tokens, mask = padded_batch(lengths=(16, 9, 12, 5, 16, 1, 7, 3), side="right", seed=1)
    batch_sh = sharding.batch_sharding(mesh)
    ours = jax.jit(lambda t, k: model.reward(t, k))(
        jax.device_put(jnp.asarray(tokens, jnp.int32), batch_sh), jax.device_put(jnp.asarray(mask), batch_sh))
    np.testing.assert_allclose(np.asarray(ours), reference_rewards(ref, tokens, mask), atol=TOL, rtol=0)


def test_reward_model_export_loads_in_transformers(reward_checkpoint, tmp_path):
    _, num_labels, directory, ref = reward_checkpoint
    save_pretrained(from_pretrained(directory), tmp_path)
    reloaded = hf_fixtures.reference_reward_model(tmp_path)
    assert reloaded.config.num_labels == num_labels
    tokens, mask = padded_batch(side="right")
    np.testing.assert_allclose(reference_rewards(reloaded, tokens, mask),
                               reference_rewards(ref, tokens, mask), atol=1e-6, rtol=0)


def test_reward_and_logits_refuse_the_wrong_kind_of_model(reward_checkpoint, tmp_path):
    _, _, directory, _ = reward_checkpoint
    tokens, mask = padded_batch()
    with pytest.raises(ValueError, match="has no unembedding"):
        from_pretrained(directory)(jnp.asarray(tokens, jnp.int32))
    policy = from_pretrained(hf_fixtures.build_checkpoint("qwen2", tmp_path, tokenizer=False))
    with pytest.raises(ValueError, match="needs a sequence-classification checkpoint"):
        policy.reward(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))


# ----------------------------------------------------------------------------- as a reward function

# The reward model reads a different conversation format than the policy's ChatML.
RM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    directory = hf_fixtures.build_checkpoint("qwen2", tmp_path_factory.mktemp("rm-scorer"), num_labels=1, seed=5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = RM_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def reference_scores(directory, conversations, completions, max_len=None):
    """One transformers forward per text (no padding at all), text from transformers' own template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ref = hf_fixtures.reference_reward_model(directory)
    scores = []
    for messages, completion in zip(conversations, completions):
        text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}],
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[-max_len:] if max_len else ids
        with torch.no_grad():
            scores.append(float(ref(input_ids=torch.tensor([ids])).logits[0, 0]))
    return np.asarray(scores, np.float32)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Say hi"}],
]
COMPLETIONS = ["It is \\boxed{5}.", "Blue, a calm colour of the sky and sea.", "#### 7"]


def test_scorer_runs_a_reward_model_sharded_with_its_own_template(reward_model_dir):
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    name = f"rm:{reward_model_dir}"
    # batch_size 2 < 3 completions: two forward passes, each padded to the 8 batch shards.
    with rewards.Scorer((name, "format"), (0.5, 2.0), mesh=mesh,
                        reward_model_kwargs=dict(max_len=128, batch_size=2)) as scorer:
        scores = scorer(COMPLETIONS, ["5", "blue", "7"], prompt_messages=CONVERSATIONS)
    expected = reference_scores(reward_model_dir, CONVERSATIONS, COMPLETIONS)
    np.testing.assert_allclose(scores.per_fn[name], expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(scores.per_fn["format"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(scores.total_B, 0.5 * expected + 2.0 * np.array([1.0, 0.0, 1.0]),
                               atol=TOL, rtol=0)
    assert scores.failures[name] == 0
    assert f"reward/{name}_mean" in scores.metrics()


def test_reward_model_keeps_the_end_of_a_long_text(reward_model_dir):
    from cfpo_jax.rewards.reward_model import RewardModel

    model = RewardModel(reward_model_dir, max_len=16)
    ours = model(CONVERSATIONS, COMPLETIONS)
    assert model.truncated == 3  # every text is longer than 16 characters (= tokens)
    np.testing.assert_allclose(ours, reference_scores(reward_model_dir, CONVERSATIONS, COMPLETIONS, 16),
                               atol=TOL, rtol=0)


def test_reward_model_inputs_are_checked(reward_model_dir, tmp_path):
    with rewards.Scorer((f"rm:{reward_model_dir}",)) as scorer:
        with pytest.raises(ValueError, match="need prompt_messages"):
            scorer(COMPLETIONS, ["", "", ""])
    causal = hf_fixtures.build_checkpoint("llama", tmp_path)
    with pytest.raises(ValueError, match="is a causal LM"):
        rewards.Scorer((f"rm:{causal}",))
