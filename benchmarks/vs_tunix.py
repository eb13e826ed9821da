"""One GRPO step of cfpo_jax against Google's Tunix (`google-tunix`), same checkpoint and settings.

    # once: Tunix in its own virtualenv (it pins other transformers/huggingface_hub versions than
    # ours); same jax / flax / optax versions as cfpo_jax's environment, so only the library differs
    python3 -m venv /work/venv-tunix
    /work/venv-tunix/bin/pip install google-tunix==0.1.7 "jax==$(python -c 'import jax; print(jax.__version__)')" \
        "jaxlib==$(python -c 'import jaxlib; print(jaxlib.__version__)')" \
        "flax==$(python -c 'import flax; print(flax.__version__)')" \
        "optax==$(python -c 'import optax; print(optax.__version__)')"

    python benchmarks/vs_tunix.py --tunix-python /work/venv-tunix/bin/python            # both shapes
    python benchmarks/vs_tunix.py --tunix-python ... --shapes small --steps 6          # minutes

What is compared, per shape (`SHAPES`):

* One random-init Qwen2 checkpoint, written offline by transformers (`Qwen2ForCausalLM` +
  `save_pretrained`) with a word-level tokenizer of exactly the model's vocabulary: printable
  characters (the prompts) plus filler tokens (what a random model mostly samples). Both libraries
  load that directory; before anything is timed each computes float32 logits of the same token
  batch, and the run stops if they differ by more than `--logit-tol`.
* The same prompt set (every prompt exactly `prompt_len` tokens), GRPO advantages (group mean,
  std), the PPO-clip objective with ε = 0.2, μ = 1 epoch, 1 minibatch (the whole rollout), β = 0
  (no reference model), token-mean aggregation, temperature 1 with no top-p / top-k, the same
  reward function (`reward_of`), the same optax chain (global-norm clip 1, AdamW lr 1e-6), float32
  parameters and compute, one device.
* cfpo_jax runs `cfpo_jax.train.run` (its own step timing: sample / score / learn); Tunix runs
  `GRPOLearner.train` on an `RLCluster` with the vanilla rollout engine (its own sampler), timed by
  wrapping `RLCluster.generate` (sample), `RLCluster.update_actor` (learn) and the learner's
  global step (step). Learn includes whatever each library computes besides the update itself
  (cfpo_jax: the old-logprob pass; Tunix with μ = 1 reuses the current logprobs).
* Each library runs in its own process (`--tunix-python` for Tunix); runs alternate
  cfpo, tunix, cfpo, tunix, ... (`--runs` each), so load on a shared machine hits both alike.
  Reported: the median over steps 2..N of all runs (step 1 compiles) and the ratio
  cfpo_jax / Tunix (below 1: cfpo_jax is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "small": dict(num_layers=2, hidden_size=128, intermediate_size=512, num_heads=4, num_kv_heads=2,
                  vocab_size=4096, prompts=16, group_size=4, prompt_len=16, new_tokens=32),
    "large": dict(num_layers=4, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                  vocab_size=8192, prompts=32, group_size=8, prompt_len=16, new_tokens=128),
}
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c\n")
LR, EPS, MAX_GRAD_NORM, SEED = 1e-6, 0.2, 1.0, 0


def describe(shape: dict) -> str:
    return (f"{shape['num_layers']} layers, hidden {shape['hidden_size']}, "
            f"vocab {shape['vocab_size'] // 1024}k; {shape['prompts']} prompts × "
            f"{shape['group_size']}, {shape['prompt_len']} + {shape['new_tokens']} tokens")


# ----------------------------------------------------------------------------- reward (both sides)


def reward_of(completion: str) -> float:
    """Fraction of digit characters: cheap, deterministic, and not constant within a group."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def cfpo_reward(completions, answers, **fields):
    del answers, fields
    return np.array([reward_of(c) for c in completions], np.float32)


def tunix_reward(prompts, completions, **kwargs):
    del prompts, kwargs
    return [reward_of(c) for c in completions]


# ----------------------------------------------------------------------------- shared inputs


def build_checkpoint(path: str, shape: dict) -> None:
    """Random-init Qwen2 (transformers, torch seed 0) and a word-level tokenizer of its vocabulary."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokens = SPECIAL_TOKENS + CHARACTERS
    tokens += tuple(f"<w{i}>" for i in range(shape["vocab_size"] - len(tokens)))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>")
    assert len(tokenizer) == shape["vocab_size"]
    config = Qwen2Config(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0,
        torch_dtype="float32")
    torch.manual_seed(SEED)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_prompts(path: str, shape: dict, count: int) -> None:
    """`count` rows of random printable text, each exactly `prompt_len` characters (= tokens)."""
    rng = np.random.default_rng(SEED)
    alphabet = np.array(list(string.ascii_letters + string.digits + "+-*=?"))
    with open(path, "w") as f:
        for _ in range(count):
            question = "".join(rng.choice(alphabet, shape["prompt_len"]))
            f.write(json.dumps({"question": question, "answer": "0"}) + "\n")


def probe_tokens(shape: dict) -> np.ndarray:
    """A [4, 24] batch of token ids for the logit check (whole vocabulary, no padding)."""
    return np.random.default_rng(SEED + 1).integers(3, shape["vocab_size"], (4, 24), dtype=np.int32)


# ----------------------------------------------------------------------------- cfpo_jax child


def run_cfpo(args, shape: dict) -> dict:
    import jax.numpy as jnp

    from cfpo_jax import models, train
    from cfpo_jax.config import base_config

    model = models.from_pretrained(args.checkpoint)
    tokens = probe_tokens(shape)
    logits = np.asarray(model(jnp.asarray(tokens), mask_BxT=jnp.ones_like(tokens)))
    del model

    c = base_config()
    c.seed = SEED
    c.model.path = args.checkpoint
    c.model.unroll_layers = True  # our CPU setting for shallow models (Tunix's layer loop is unrolled too)
    c.data.source = f"jsonl:{args.prompts}"
    c.data.template = "plain"
    c.data.batch_size = shape["prompts"]
    c.sampling.max_prompt_len = shape["prompt_len"]
    c.sampling.max_new_tokens = shape["new_tokens"]
    c.sampling.temperature = 1.0
    c.rewards.fns = ("vs_tunix:cfpo_reward",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 1
    c.rl.objective = "ppo"
    c.rl.estimator = "grpo"
    c.rl.agg = "token-mean"
    c.rl.eps = EPS
    c.rl.group_size = shape["group_size"]
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 1
    c.rl.beta = 0.0
    c.optim.lr = LR
    c.optim.max_grad_norm = MAX_GRAD_NORM
    c.train.num_steps = args.steps
    c.train.checkpoint_every = 10 ** 6
    c.train.log_every = 10 ** 6
    c.train.tensorboard = False
    with tempfile.TemporaryDirectory() as workdir:
        history = train.run(c, workdir)["history"]
    return dict(logits=logits.tolist(),
                step=[h["time_step_s"] for h in history],
                sample=[h["time_sample_s"] for h in history],
                learn=[h["time_learn_s"] for h in history])


# ----------------------------------------------------------------------------- Tunix child


def run_tunix(args, shape: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from transformers import AutoTokenizer
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.utils import mesh as mesh_lib

    mesh = mesh_lib.create_mesh((1, 1), ("fsdp", "tp"))
    config = qwen2_model.ModelConfig(
        num_layers=shape["num_layers"], vocab_size=shape["vocab_size"],
        embed_dim=shape["hidden_size"], hidden_dim=shape["intermediate_size"],
        num_heads=shape["num_heads"], head_dim=shape["hidden_size"] // shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"], rope_theta=10000, norm_eps=1e-6,
        use_tied_embedding=True)
    model = qwen2_params.create_model_from_safe_tensors(args.checkpoint, config, mesh)
    tokens = jnp.asarray(probe_tokens(shape))
    B, T = tokens.shape
    logits, _ = model(tokens, positions=jnp.broadcast_to(jnp.arange(T), (B, T)), cache=None,
                      attention_mask=jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T)))
    logits = np.asarray(logits)

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    optimizer = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                            optax.adamw(LR, b1=0.9, b2=0.999, weight_decay=0.0))
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10 ** 6, max_steps=args.steps),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=shape["new_tokens"], max_prompt_length=shape["prompt_len"],
            kv_cache_size=shape["prompt_len"] + shape["new_tokens"], temperature=1.0, top_p=1.0,
            top_k=None))
    cluster = rl_cluster_lib.RLCluster(actor=model, tokenizer=tokenizer, cluster_config=cluster_config)
    learner = grpo_learner.GRPOLearner(
        cluster,
        grpo_learner.GRPOConfig(num_generations=shape["group_size"], num_iterations=1, beta=0.0,
                                epsilon=EPS, loss_agg_mode="token-mean"),
        reward_fns=[tunix_reward])

    times = dict(step=[], sample=[], learn=[])

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            jax.block_until_ready(jax.tree.leaves(out) if name != "learn" else
                                  jax.tree.leaves(cluster.actor_trainer.model))
            times[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    cluster.generate = timed("sample", cluster.generate)
    cluster.update_actor = timed("learn", cluster.update_actor)
    learner._run_global_step = timed("step", learner._run_global_step)  # pylint: disable=protected-access

    with open(args.prompts) as f:
        questions = [json.loads(line)["question"] for line in f]
    size = shape["prompts"]
    # Arrays, as a grain loader yields them (the learner tree-maps `np.repeat` over the batch).
    batches = [{"prompts": np.array(questions[i * size:(i + 1) * size])} for i in range(args.steps)]
    learner.train(batches)
    return dict(logits=logits.tolist(), **times)


# ----------------------------------------------------------------------------- parent


def child(library: str, python: str, shape_name: str, checkpoint: str, prompts: str,
          steps: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [python, os.path.abspath(__file__), "--child", library, "--shapes", shape_name,
                   "--checkpoint", checkpoint, "--prompts", prompts, "--steps", str(steps),
                   "--out", out.name]
        # The reward function is imported by name ("vs_tunix:cfpo_reward") in reward workers too.
        path = os.pathsep.join(filter(None, [REPO, os.path.dirname(os.path.abspath(__file__)),
                                             os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)
        subprocess.run(command, check=True, env=env)
        with open(out.name) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,large", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--steps", type=int, default=0,
                        help="RL steps per run (default 8 small, 4 large); step 1 is not counted")
    parser.add_argument("--runs", type=int, default=2, help="runs per library, alternating")
    parser.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON", ""),
                        help="interpreter of a virtualenv with google-tunix (see the docstring)")
    parser.add_argument("--logit-tol", type=float, default=1e-4)
    parser.add_argument("--child", choices=("cfpo", "tunix"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        shape = SHAPES[args.shapes]
        result = (run_cfpo if args.child == "cfpo" else run_tunix)(args, shape)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    if not args.tunix_python:
        sys.exit("error: pass --tunix-python (a virtualenv with google-tunix; the docstring has the "
                 "install command)")
    names = args.shapes.split(",")
    for name in names:
        if name not in SHAPES:
            sys.exit(f"error: unknown shape {name!r}; valid: {list(SHAPES)}")
    header = ("| shape | cfpo_jax step | Tunix step | step ratio | cfpo_jax sample | Tunix sample "
              "| sample ratio | cfpo_jax learn | Tunix learn | learn ratio | max logit diff |\n"
              + "|---" * 11 + "|")
    rows = []
    for name in names:
        shape = SHAPES[name]
        steps = args.steps or (8 if name == "small" else 4)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint, prompts = os.path.join(tmp, "ckpt"), os.path.join(tmp, "prompts.jsonl")
            build_checkpoint(checkpoint, shape)
            write_prompts(prompts, shape, shape["prompts"] * steps)
            results = {"cfpo": [], "tunix": []}
            for run in range(args.runs):
                for library, python in (("cfpo", sys.executable), ("tunix", args.tunix_python)):
                    t0 = time.time()
                    results[library].append(child(library, python, name, checkpoint, prompts, steps))
                    print(f"[{name}] run {run + 1}/{args.runs} {library}: {time.time() - t0:.0f} s",
                          flush=True)
        ours, theirs = (np.array(results[k][0]["logits"]) for k in ("cfpo", "tunix"))
        logit_diff = float(np.max(np.abs(ours - theirs)))
        if logit_diff > args.logit_tol:
            sys.exit(f"error: [{name}] logits differ by {logit_diff:.2e} > --logit-tol "
                     f"{args.logit_tol}: the two libraries do not run the same model")
        median = {lib: {k: statistics.median(t for r in results[lib] for t in r[k][1:])
                        for k in ("step", "sample", "learn")} for lib in results}
        cells = []
        for k in ("step", "sample", "learn"):
            ours, theirs = median["cfpo"][k], median["tunix"][k]
            cells += [f"{ours:.3f} s", f"{theirs:.3f} s", f"{ours / theirs:.2f}×"]
        rows.append(f"| {describe(shape)} | " + " | ".join(cells) + f" | {logit_diff:.1e} |")
        print(f"\n{header}\n{rows[-1]}\n", flush=True)  # each shape as soon as it is done
    print(f"\n{header}\n" + "\n".join(rows))
    print("\nMedians of steps 2..N over all runs; ratio = cfpo_jax / Tunix (below 1: cfpo_jax faster).")


if __name__ == "__main__":
    main()
