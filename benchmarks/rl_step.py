"""One RL step of the real training loop, timed by stage: sample / score / learn.

    python benchmarks/rl_step.py             # GPU: Qwen2.5-0.5B shape, 64 prompts × 8, 512 + 1024 tokens
    python benchmarks/rl_step.py --small     # CPU: tiny shape, 8 prompts × 4, 16 + 32 tokens (~2 min, 2 cores)
    python benchmarks/rl_step.py --epochs 4 --minibatches 4   # the paper's off-policy settings

It runs the trainer's own parts (`cfpo_jax.state.create_state`, `learner.Learner`,
`rollout.Rollout`) on a random-init decoder of the given shape with fp32 master weights, bf16 compute and
remat, CFPO, group-relative advantages. What differs from a real run is only what feeds it: the
prompts are random token ids of a fixed length, the "tokenizer" writes token ids as numbers, and
the reward is the fraction of even ids in the completion, with no EOS so that every row runs
the whole budget (the worst case a config must be sized for). Lengths are math_qwen's (1,024 +
1,024, 5 samples per prompt, 1,024 prompts on 8 GPUs) scaled to one GPU: 512-token prompts,
1,024 new tokens, 64 prompts × 8 samples.

Per step (median over steps 2..N; step 1 compiles):
* sample: `generate` until the completion tokens are on the host; tokens/s = new tokens / time.
* score: detokenising and the reward on the host; completions/s. The synthetic reward is cheap,
  so this is the trainer's overhead, not math-verify's cost.
* learn: advantages and (off policy) the old-logprob forward, then num_epochs × num_minibatches
  updates, until the step's metrics are on the host; tokens/s = rollout tokens (prompt +
  completion columns) × num_epochs / time.

`--json PATH` also writes the table's figures as JSON (for benchmarks/accelerator.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

# Run as a script from a checkout: the package is the directory above this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes import SHAPES  # noqa: E402  (the one table of benchmark shapes)


class NumberTokenizer:
    """Writes token ids as space-separated numbers: all the trainer needs to score text."""

    pad_token_id = 0

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in rows]


def even_fraction(completions, answers, **fields):
    """Synthetic reward: the fraction of even token ids in the completion (dense, varies per row)."""
    del answers, fields
    return np.array([np.mean([int(t) % 2 == 0 for t in c.split()] or [0.0]) for c in completions],
                    np.float32)


def make_config(args):
    from cfpo_jax import config as config_lib

    c = config_lib.base_config()
    c.model.path = f"random:{args.shape}"
    c.model.param_dtype, c.model.dtype, c.model.remat = "float32", "bfloat16", True
    c.data.batch_size = args.prompts
    c.sampling.max_prompt_len = args.prompt_len
    c.sampling.max_new_tokens = args.new_tokens
    c.rewards.fns = ("benchmarks.rl_step:even_fraction",)
    c.rl.group_size = args.samples
    c.rl.num_epochs, c.rl.num_minibatches = args.epochs, args.minibatches
    c.rl.micro_batch_size = args.micro_batch
    c.optim.lr = 1e-6
    c.train.num_steps = args.steps
    config_lib.validate(c)
    return c


def build(config, shape):
    """The trainer's stage 1 on a random-init model: (learner, rollout, state)."""
    from flax import nnx

    from cfpo_jax import sharding
    from cfpo_jax.models import ModelConfig, Transformer

    model_config = ModelConfig(model_type="qwen2", qkv_bias=True, rope_theta=1e6,
                               max_position_embeddings=32768, param_dtype=config.model.param_dtype,
                               dtype=config.model.dtype, remat=config.model.remat, **SHAPES[shape])
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    model = sharding.shard_model(Transformer(model_config, rngs=nnx.Rngs(config.seed)), mesh)
    return build_parts(config, model, mesh)


def build_parts(config, model, mesh):
    """The trainer's parts around a hand-built `model` already sharded on `mesh`, with the number
    tokenizer and no EOS: (learner, rollout, state)."""
    import jax
    from flax import nnx

    from cfpo_jax import learner, policy, rollout, state

    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx, schedule = state.make_optimizer(config.optim, state.total_updates(config))
    init, abstract_state = state.create_state(params, tx, mesh, seed=config.seed, beta=config.rl.beta)
    learner_ = learner.Learner(config, mesh, graphdef, frozen, pad_id=0, tx=tx, schedule=schedule,
                               state_sh=jax.tree.map(lambda x: x.sharding, abstract_state))
    loaded = policy.Policy(graphdef=graphdef, params=params, frozen=frozen,
                           tokenizer=NumberTokenizer(), eos_ids=(), pad_id=0, model_path="",
                           base_model=None)
    return learner_, rollout.Rollout(config, mesh, loaded, learner_), init(params)


def prompts_batch(config, vocab_size, seed):
    from cfpo_jax import data

    rng = np.random.default_rng(seed)
    # Ids from 1 up: 0 is the pad id. Every prompt has the full length.
    prompts = rng.integers(1, vocab_size, (config.data.batch_size, config.sampling.max_prompt_len))
    examples = [{"question": "", "answer": ""} for _ in prompts]
    return data.Batch(examples, prompts.tolist(), [""] * len(prompts))


def run(args):
    import jax

    from cfpo_jax import metrics as metrics_lib

    config = make_config(args)
    learner, rollout, state = build(config, args.shape)
    rows = config.data.batch_size * config.rl.group_size
    new_tokens = rows * config.sampling.max_new_tokens
    learn_tokens = rows * (config.sampling.max_prompt_len + config.sampling.max_new_tokens) \
        * config.rl.num_epochs
    times = []
    for step in range(config.train.num_steps):
        next_rng, sample_key = learner.split_rng(state["rng"])
        result = rollout(state, prompts_batch(config, SHAPES[args.shape]["vocab_size"], step),
                         sample_key)
        stage_times = result.times
        t_learn = time.perf_counter()
        with jax.transfer_guard("disallow"):
            state, update_metrics = learner.learn(state, result.batch, result.lengths_Bx2, step)
            state = learner.finish_step(state, next_rng)
        metrics = metrics_lib.step_metrics(result.host_metrics, result.device_metrics,
                                           update_metrics, state)
        learn_s = time.perf_counter() - t_learn
        times.append((stage_times["time_sample_s"], stage_times["time_score_s"], learn_s))
        print(f"step {step + 1}: sample {times[-1][0]:.2f} s  score {times[-1][1]:.2f} s  "
              f"learn {learn_s:.2f} s  reward {metrics['reward_mean']:.3f}  "
              f"loss {metrics['loss']:.4f}", flush=True)
    sample_s, score_s, learn_s = (statistics.median(column) for column in zip(*times[1:]))
    step_s = sample_s + score_s + learn_s
    print(f"\n{jax.devices()[0].device_kind} × {jax.device_count()}, shape {args.shape}, "
          f"{config.data.batch_size} prompts × {config.rl.group_size}, "
          f"{config.sampling.max_prompt_len} + {config.sampling.max_new_tokens} tokens, "
          f"{config.rl.num_epochs} epochs × {config.rl.num_minibatches} minibatches; "
          f"median of steps 2..{config.train.num_steps}\n")
    print("| stage | s/step | share | throughput |")
    print("|---|---|---|---|")
    print(f"| sample | {sample_s:.3f} | {sample_s / step_s:.0%} | {new_tokens / sample_s:,.0f} new tokens/s |")
    print(f"| score | {score_s:.3f} | {score_s / step_s:.0%} | {rows / score_s:,.0f} completions/s |")
    print(f"| learn | {learn_s:.3f} | {learn_s / step_s:.0%} | {learn_tokens / learn_s:,.0f} tokens/s |")
    print(f"| step | {step_s:.3f} | 100% | {new_tokens / step_s:,.0f} new tokens/s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
                           shape=args.shape, prompts=config.data.batch_size, samples=config.rl.group_size,
                           prompt_len=config.sampling.max_prompt_len, new_tokens_per_row=config.sampling.max_new_tokens,
                           epochs=config.rl.num_epochs, minibatches=config.rl.num_minibatches,
                           steps=config.train.num_steps, sample_s=sample_s, score_s=score_s, learn_s=learn_s,
                           step_s=step_s, new_tokens=new_tokens, learn_tokens=learn_tokens, sequences=rows), f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU smoke run at the tiny shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the table's figures to this file")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (figures are medians over steps 2..N; step 1 compiles); got {args.steps}")
    small = dict(shape="tiny", prompts=8, samples=4, prompt_len=16, new_tokens=32, micro_batch=0)
    full = dict(shape="0.5b", prompts=64, samples=8, prompt_len=512, new_tokens=1024,
                micro_batch=64)
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    run(args)


if __name__ == "__main__":
    main()
