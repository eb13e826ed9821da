r"""The DAPO recipe (Yu et al. 2025; verl's recipe/dapo) on Qwen3-8B-Base and DAPO-Math-17k, with
CFPO or GRPO: clip-higher (ε_low 0.2, ε_high 0.28), token-mean loss, dynamic sampling, the
overlong filter off and the soft overlong punishment on (as DAPO's own scripts), no KL.

Launch (a GPU cluster; see launch/gpu.sh — a step samples 8,192 responses of up to 8,192 tokens):
  python -m cfpo_jax.train --config=configs/dapo_qwen.py:cfpo --workdir=runs/dapo_qwen_cfpo
  # the DAPO baseline itself: the clipped objective with clip-higher, same everything else
  python -m cfpo_jax.train --config=configs/dapo_qwen.py:grpo --workdir=runs/dapo_qwen_grpo
  # with the entropy mechanism paper's Clip-Cov on top (its ratio and band)
  python -m cfpo_jax.train --config=configs/dapo_qwen.py:cfpo --config.rl.entropy_control=clip_cov

Where the numbers come from (verl's recipe/dapo scripts; DAPO paper §3–4):
  * 512 prompts per step, 16 responses each, minibatches of 32 prompts (so 16 updates per rollout,
    one epoch: off policy from the second update on — where CFPO and the clip differ),
    lr 1e-6 with 10 warm-up updates, weight decay 0.1, gradient clipping 1.0, temperature 1.
  * Prompt up to 2,048 tokens, response up to 8,192 with a 4,096-token overlong buffer and penalty
    factor 1 (verl's 7B/8B DAPO scripts; the 32B run uses 20,480 and 4,096).
  * Dynamic sampling: verl generates 1,536 prompts at a time and allows 10 such batches; here a
    round is the step's 512 prompts, so up to 30 rounds is the same budget of prompts.
  * CFPO's ε_high = 0.28 makes its fixed point r* = 1 + ε·sign(A) sit where clip-higher clips
    (cfpo_jax.losses; the CFPO paper's patches use one ε — set rl.eps_high=None for theirs).

Data: `hf:BytedTsinghua-SIA/DAPO-Math-17k` (verl's RL format, the `dapo_math` preset: the problem
without DAPO's "Answer:" instruction, the integer ground truth). The prompt asks for \boxed{}, which
the `math` reward (math-verify) reads. Evaluated on MATH-500 every 10 steps (mean@4).

Compiled for its chips (benchmarks/compile.py with the Qwen3-8B shape of benchmarks/shapes.py —
config.json of Qwen/Qwen3-8B-Base: hidden 4096, MLP 12,288, 36 layers, 32 heads / 8 kv heads of 128,
qk-norm, vocab 151,936, untied head; 8.19B parameters — the run's own programs for compile-only
devices; per-chip GB = 1e9 bytes, measured by the compiler; benchmarks/README.md, 2026-12-06, issue
34). The CFPO and GRPO variants differ only in the update's loss (same shapes, same programs
otherwise; the GRPO update compiled too). Per-chip peak of each program and "run": the sampler's
peak + the training state (the update's arguments) resident beside it:
  target   update  prepare  prefill  decode   run           kernels
  h100x8    30.5     7.3     39.2     39.6    51.9 of 84.9  cuDNN, Pallas decode
  v5p-8     78.2    15.6     40.1     41.4    66.0 of 102   splash, paged
Compiled matmul FLOPs / model FLOPs (6·params·tokens for the update, 2·params·tokens per
forward): update 1.12 (the rematted forward), prepare 0.91, prefill 0.83 (no logits over the
prompt), decode 0.92 (the untied embedding is a lookup, not a matmul). The sampler has 15 slots
per GPU: a slot's keys and values over 10,240 columns are 2 × 36 × 8 × 10,240 × 128 × 2 bytes =
1.51 GB, and kv_cache_gb = 24 holds 15 of them. With 8,192 responses of up to 8,192 tokens that is
559,241 decode steps of 120 rows per RL step; each step reads 15.1 GB of bf16 weights and, at the
mean valid length, 13.6 GB of keys and values (benchmarks/decode_bytes.py: ideal 28.7 GB per GPU,
the compiled step 1.05 × its full-length ideal), ≥ 8.6 ms at an H100's 3.35 TB/s, so ≥ 79 min of
decoding per step when every response runs to the limit (a bound from bytes and bandwidth, not a
time; the FLOPs-only step bound compile.py prints, ≥ 870 s, misses it). More slots per GPU spread
the weights' read over more rows: the 33 GB the run leaves free on an H100 would hold ~21 more,
and at 36 per GPU the same bound is ≥ 55 min (sampling.kv_cache_gb ≈ 55). A v5p-8 (4 chips) fits
the recipe but, with 60 slots, bounds a step at ≥ 4 h (1,118,482 decode steps of ≥ 10.2 ms from
XLA's bytes and the chip's bandwidth): run it on a larger slice (more chips: more slots).
"""

from cfpo_jax.config import base_config

VARIANTS = {"cfpo": "cfpo", "grpo": "ppo"}
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def get_config(arg: str = "cfpo"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; valid: {sorted(VARIANTS)}")
    c = base_config()
    c.seed = 0
    c.workdir = f"runs/dapo_qwen_{arg}"

    c.model.path = "Qwen/Qwen3-8B-Base"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = True

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    c.data.source = "hf:BytedTsinghua-SIA/DAPO-Math-17k:train"
    c.data.preset = "dapo_math"
    c.data.template = "chat"
    c.data.system_prompt = SYSTEM_PROMPT
    c.data.batch_size = 512

    c.sampling.max_prompt_len = 2048
    c.sampling.max_new_tokens = 8192
    c.sampling.temperature = 1.0
    c.sampling.max_concurrent = 0  # as many slots as kv_cache_gb holds (~16 per GPU, above)
    c.sampling.kv_cache_gb = 24.0

    c.rewards.fns = ("math",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 16
    c.rewards.timeout_s = 5.0
    c.rewards.overlong_buffer = 4096
    c.rewards.overlong_penalty = 1.0

    c.eval.sources = ("hf:HuggingFaceH4/MATH-500:test",)
    c.eval.num_samples = 4
    c.eval.ks = (1, 4)
    c.eval.greedy = False
    c.eval.every_steps = 10

    c.rl.objective = VARIANTS[arg]
    c.rl.eps = 0.2
    c.rl.eps_high = 0.28
    c.rl.level = "token"
    c.rl.agg = "token-mean"
    c.rl.estimator = "grpo"
    c.rl.group_size = 16
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 16
    c.rl.micro_batch_size = 8
    c.rl.beta = 0.0
    c.rl.dynamic_sampling = True
    c.rl.dynamic_sampling_max_rounds = 30
    c.rl.overlong_filter = False

    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.1
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 200
    c.train.checkpoint_every = 10
    c.train.keep_checkpoints = 3
    c.train.export_hf = True
    return c
