"""Sequence packing (`rl.pack`, issue 22): the learner and the whole RL step, packed vs padded.

    python benchmarks/packing.py                      # CPU: 4 layers, hidden 256, vocab 8k
    python benchmarks/packing.py --smoke --repeats 1  # the whole script at a toy size, a minute

At vs_tunix.py's "large" shape (4 layers, hidden 256, vocab 8k; 32 prompts × 8 samples, 16-token
prompts, 128-token budget), float32, with 1 epoch × 2 minibatches (off policy from the
second update, so the old-logprob pass runs) and CFPO. Completion lengths per row come from:
* `longtail`: a synthetic long-tailed distribution, exponential with mean about 0.3 of the budget,
  cut at the budget (the cut rows are the truncated ones); the longest row is set to the budget so
  that both paths have N = budget columns;
* `full`: every row the whole budget (the case packing cannot help; it must not hurt).
The random-init model is made to stop at those lengths by per-row sampling budgets (`generate`'s
per-prompt `max_new_tokens`, one prompt per row), so the RL step is a real one: `generate`, the
(cheap, synthetic) reward on the host, then the trainer's own `prepare_batch` (the old-logprob
pass) and `learn` (all updates). Per repeat the rollout is sampled once and learned from by both
paths, alternating which goes first, so that the shared box's load hits both alike. Every repeat
has the same lengths and minibatches, so the untimed repeat 0 compiles every packed shape the
timed ones use: this is the steady state of a run, whose ladder of row counts compiles each
shape once (the `learner_shapes` metric counts them).

Columns: learner = prepare_batch + learn until the step's metrics are on the host; step =
sample + score + learner; speedup = padded / packed; memory = XLA's compiled temporary plus
argument bytes of the largest update and old-logprob programs each path ran (the packed path's
largest row bucket), a bound on what the programs need, not a process RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPE = dict(num_layers=4, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
             head_dim=64, vocab_size=8192)  # vs_tunix.py "large"
PROMPTS, GROUP, PROMPT_LEN, BUDGET = 32, 8, 16, 128


def completion_lengths(dist: str, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "full":
        return np.full(rows, BUDGET)
    # Exponential cut at the budget: E[min(X, N)] = μ(1 − exp(−N/μ)) = 0.3 N at μ ≈ 0.311 N.
    lengths = np.clip(np.ceil(rng.exponential(0.311 * BUDGET, rows)), 1, BUDGET).astype(int)
    lengths[np.argmax(lengths)] = BUDGET
    return lengths


def even_fraction(completions, answers, **fields):
    del answers, fields
    return np.array([np.mean([int(t) % 2 == 0 for t in c.split()] or [0.0]) for c in completions],
                    np.float32)


def build(pack: bool, params_seed: int = 0):
    import jax
    from flax import nnx

    from cfpo_jax import config as config_lib
    from cfpo_jax import sharding, train
    from cfpo_jax.models import ModelConfig, Transformer
    from rl_step import NumberTokenizer

    c = config_lib.base_config()
    c.model.path = "random"  # built here, not loaded
    c.data.batch_size, c.rl.group_size = PROMPTS, GROUP
    c.sampling.max_prompt_len, c.sampling.max_new_tokens = PROMPT_LEN, BUDGET
    c.rewards.fns = ("packing:even_fraction",)
    c.rl.num_epochs, c.rl.num_minibatches = 1, 2
    c.rl.pack = pack
    c.optim.lr = 1e-6
    c.train.num_steps = 100
    config_lib.validate(c)
    model_config = ModelConfig(model_type="qwen2", qkv_bias=True, rope_theta=1e6,
                               max_position_embeddings=4096, unroll_layers=True, **SHAPE)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = sharding.shard_model(Transformer(model_config, rngs=nnx.Rngs(params_seed)), mesh)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx, schedule = train.make_optimizer(c.optim, 1000)
    init, abstract_state = train.create_state(params, tx, mesh, seed=0, beta=0.0)
    state = init(params)
    setup = train.make_setup(c, mesh, graphdef, frozen, NumberTokenizer(), eos_ids=(), pad_id=0,
                             tx=tx, schedule=schedule,
                             state_sh=jax.tree.map(lambda x: x.sharding, abstract_state))
    return setup, state


def sample(setup, state, lengths, seed):
    """One rollout with row b stopped at lengths[b] tokens: (samples, rewards, seconds)."""
    import jax
    from flax import nnx

    from cfpo_jax import sampling

    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, SHAPE["vocab_size"], (PROMPTS, PROMPT_LEN)).tolist()
    rows = [p for p in prompts for _ in range(GROUP)]  # group by group, one prompt per row
    t0 = time.perf_counter()
    samples = sampling.generate(
        nnx.merge(setup.graphdef, state["params"], setup.frozen), rows,
        max_new_tokens=[int(n) for n in lengths], temperature=1.0, seed=seed, n=1, pad_id=0,
        mesh=setup.mesh, **sampling.engine_settings(setup.config.sampling))
    tokens, got = jax.device_get((samples.tokens, samples.lengths))
    t1 = time.perf_counter()
    assert np.array_equal(got, lengths), "rows must stop at their budgets"
    reward = even_fraction([" ".join(map(str, row[:n])) for row, n in zip(tokens, got)], None)
    return samples, reward, t1 - t0, time.perf_counter() - t1


def learner(setup, state, samples, reward, lengths, step):
    import jax

    from cfpo_jax import train

    t0 = time.perf_counter()
    lengths_Bx2 = np.stack([np.full(len(lengths), PROMPT_LEN), lengths], axis=1)
    batch, device_metrics = train.prepare_batch(setup, state, samples, reward, lengths_Bx2)
    with jax.transfer_guard("disallow"):
        state, update_metrics = train.learn(setup, state, batch, step)
    metrics = jax.device_get((device_metrics, update_metrics))
    return state, metrics, time.perf_counter() - t0


def run(args):
    import jax

    results = {}
    for dist in args.dists.split(","):
        arms = {name: build(pack) for name, pack in (("padded", False), ("packed", True))}
        states = {name: arm[1] for name, arm in arms.items()}
        times = {name: [] for name in arms}
        sample_times = []
        losses = {name: [] for name in arms}
        for repeat in range(args.repeats + 1):  # repeat 0 compiles
            # Same lengths and minibatches every repeat: repeat 0 compiles every packed shape the
            # timed repeats use (a run compiles each row bucket once; `learner_shapes`).
            lengths = completion_lengths(dist, PROMPTS * GROUP, seed=0)
            samples, reward, sample_s, score_s = sample(arms["padded"][0], states["padded"],
                                                        lengths, seed=repeat)
            order = ("padded", "packed") if repeat % 2 else ("packed", "padded")
            for name in order:
                setup = arms[name][0]
                states[name], metrics, learn_s = learner(setup, states[name], samples, reward,
                                                         lengths, step=0)
                if repeat:
                    times[name].append(learn_s)
                losses[name].append(float(np.mean([m["loss"] for m in metrics[1]])))
            if repeat:
                sample_times.append(sample_s + score_s)
            print(f"{dist} repeat {repeat}: mean length {lengths.mean():.1f}  sample+score "
                  f"{sample_s + score_s:.2f} s  " + "  ".join(
                      f"{n} learner {times[n][-1] if repeat else float('nan'):.2f} s" for n in arms),
                  flush=True)
        shapes = sorted(shape for kind, shape in arms["packed"][0].learner_shapes)
        memory = {name: max(_program_bytes(arms[name][0], states[name], name == "packed",
                                           dist)) for name in arms}
        results[dist] = dict(
            mean_len=float(completion_lengths(dist, PROMPTS * GROUP, 0).mean()),
            learn={n: statistics.median(t) for n, t in times.items()},
            step={n: statistics.median(np.add(t, sample_times)) for n, t in times.items()},
            memory=memory, shapes=shapes,
            loss_gap=max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"])))
    print(f"\n{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{PROMPTS} prompts × {GROUP}, {PROMPT_LEN} + {BUDGET} tokens, 1 epoch × 2 minibatches; "
          f"median of {args.repeats} repeats\n")
    print("| lengths | mean len | learner padded s | learner packed s | learner speedup | "
          "step padded s | step packed s | step speedup | memory padded MB | memory packed MB | "
          "packed shapes (R, W, N) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dist, r in results.items():
        print(f"| {dist} | {r['mean_len']:.1f} | {r['learn']['padded']:.2f} | "
              f"{r['learn']['packed']:.2f} | {r['learn']['padded'] / r['learn']['packed']:.2f}× | "
              f"{r['step']['padded']:.2f} | {r['step']['packed']:.2f} | "
              f"{r['step']['padded'] / r['step']['packed']:.2f}× | "
              f"{r['memory']['padded'] / 2**20:.0f} | {r['memory']['packed'] / 2**20:.0f} | "
              f"{sorted(set(s for s in r['shapes']))} |")
    for dist, r in results.items():
        print(f"{dist}: largest |mean loss padded − packed| over the repeats {r['loss_gap']:.2e}")


def _program_bytes(setup, state, packed, dist):
    """Compiled temp + argument bytes of the update and the old-logprob (prepare) programs at the
    largest shape this path ran, from abstract inputs (nothing runs)."""
    import jax
    import jax.numpy as jnp

    from cfpo_jax import sampling

    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
    B, P, N = PROMPTS * GROUP, PROMPT_LEN, BUDGET
    samples = sampling.Samples(prompt_tokens=spec((B, P)), prompt_mask=spec((B, P)),
                               tokens=spec((B, N)), mask=spec((B, N)),
                               logprobs=spec((B, N), jnp.float32), lengths=spec((B,)),
                               eos=spec((B,), bool))
    sizes = []
    state_spec = jax.tree.map(lambda x: spec(x.shape, x.dtype), state)
    if packed:
        shapes = {(kind, s) for kind, s in setup.learner_shapes}
        R_prepare = max(s[0] for kind, s in shapes if kind == "prepare")
        R_update = max(s[0] for kind, s in shapes if kind == "update")
    S = B // setup.config.rl.num_minibatches
    for kind in ("prepare", "update"):
        if kind == "prepare":
            args = [state["params"], None, setup.frozen, samples, spec((B,), jnp.float32)]
            if packed:
                R = R_prepare
                args.append(dict(token_src=spec((R, P + N)), segment=spec((R, P + N)),
                                 positions=spec((R, P + N)), comp_col=spec((R, N)),
                                 comp_src=spec((R, N)), comp_seq=spec((R, N)),
                                 comp_mask=spec((R, N)), unpack=spec((B, N)), rows=spec((B,))))
            lowered = setup.prepare.lower(*args)
        else:
            if packed:
                R = R_update
                batch = dict(tokens=spec((R, P + N)), segment=spec((R, P + N)),
                             positions=spec((R, P + N)), comp_col=spec((R, N)),
                             comp_seq=spec((R, N)), adv=spec((S,), jnp.float32),
                             mask=spec((R, N), jnp.float32), old_logp=spec((R, N), jnp.float32))
            else:
                batch = dict(tokens=spec((S, P + N)), attn=spec((S, P + N)),
                             mask=spec((S, N), jnp.float32), adv=spec((S,), jnp.float32),
                             old_logp=spec((S, N), jnp.float32))
            lowered = setup.update.lower(state_spec, setup.frozen, batch)
        analysis = lowered.compile().memory_analysis()
        sizes.append(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes)
    return sizes


def main():
    global PROMPTS, BUDGET
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (one more compiles)")
    parser.add_argument("--dists", default="longtail,full", help="comma list of longtail, full")
    parser.add_argument("--smoke", action="store_true", help="4 prompts, 16-token budget, 1 layer")
    args = parser.parse_args()
    if args.smoke:
        PROMPTS, BUDGET = 4, 16
        SHAPE.update(num_layers=1, vocab_size=512)
    run(args)


if __name__ == "__main__":
    main()
