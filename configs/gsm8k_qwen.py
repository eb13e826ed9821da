r"""GSM8K with Qwen2.5-0.5B-Instruct and CFPO: one GPU (24 GB+) or a Colab TPU (v2-8 / v5e-1).

Launch:
  python -m cfpo_jax.train --config=configs/gsm8k_qwen.py --workdir=runs/gsm8k_qwen
  python -m cfpo_jax.train --config=configs/gsm8k_qwen.py:1.5b   # Qwen2.5-1.5B-Instruct, 48 GB+
Colab TPU: see launch/colab.md (install, then the same command).

Expected run time on one H100 (an estimate, not yet measured end to end): ≈ 15 s per RL step,
≈ 1 h for the 200 steps with evaluations. Basis: each step samples 64 × 8 completions of up to 512
tokens (262k tokens at the 37.8k tokens/s benchmarks/README.md measured for this shape at batch
256: ≤ 7 s), then one logprob forward and one rematted forward/backward over 512 × 768 tokens
(≈ 2e15 FLOPs, ≈ 7 s at ~300 TFLOP/s); a greedy evaluation of 500 problems every 25 steps ≈ 10 s.
A Colab TPU is slower: count several times that.

Compiled for the real chips (benchmarks/compile.py, GPU/TPU compilers on compile-only devices,
per-chip GB = 1e9 bytes; benchmarks/README.md, 2026-12-03): 0.5b on one H100 — update peak
13.6 GB, old-logprob pass 3.5 GB, sampler prefill 7.1 GB, decode 6.5 GB, cuDNN attention and the
Pallas decode kernel in the HLO; smallest target it fits: h100x1 (the largest need is the
update's 13.6 GB; while sampling, the 5.9 GB training state stays resident beside the sampler's
7.1 GB: ≈ 13 GB, so within a 24 GB card too). On a v5e-8 (16 GB chips, 8-way FSDP) the update peaks at 3.6 GB and the
old-logprob pass at 1.8 GB, the prefill at 1.8 GB and decode at 2.9 GB (einsum attention: head_dim
64 is not splash's 128); it fits a v5e-8 (with its 0.75 GB of state resident, at most 3.6 of 17.2). 1.5b on one
H100: update peak 32.1 GB, old-logprob pass 7.9 GB, sampler prefill 9.9 GB and decode 9.0 GB
(second session); fits h100x1 (its docstring's 48 GB+ card holds the update; while sampling, the
18.5 GB training state beside the prefill's 9.9 GB: ≈ 28 GB).
1.5b on a v5e-8 (8-way FSDP, as configured; 2026-12-03 second session, continued): update peak
6.9 GB, old-logprob pass 1.9 GB, prefill 4.0 GB, decode 4.0 GB per chip, splash and paged attention;
fits (with the 2.3 GB training state resident beside the sampler, at most 6.9 GB of 17.2).

Sampling memory (one GPU; cfpo_jax.sampling): the 64 × 8 = 512 rows of a step decode at once
(sampling.max_concurrent = 512, the whole rollout) for 0.5b; each slot holds keys and values for
768 cache columns (256-token prompt bucket + 512 new, rounded up to 128) = 2 × layers × 2 kv
heads × 768 × head dim × 2 bytes (bf16). Weights: fp32 master + Adam = params × 12 bytes, and the
bf16 copy gathered once per rollout = params × 2 bytes:
  size  params  master+Adam  bf16 copy  KV per slot  slots  KV cache  total
  0.5b  0.49B     5.9 GB      1.0 GB      9.4 MB      512    4.8 GB   ~12 GB (+ 0.3 GB logits) of 24
  1.5b  1.54B    18.5 GB      3.1 GB     22.0 MB      256    5.6 GB   ~27 GB (+ 0.2 GB logits) of 40
Figures computed from the shapes (cfpo_jax.sampling.kv_bytes_per_slot), not measured on a GPU yet.

Numbers: CFPO ε = 0.2, β = 0, GRPO advantages as in the paper; GSM8K train / test with the
`#### <answer>` preset; prompt 256 and response 512 tokens (GSM8K questions are short and
solutions rarely exceed 300 tokens); learning rate 1e-6 as verl's GSM8K GRPO examples; 64 prompts
× 8 samples per step, 2 minibatches (batch ratio 2) and micro-batches of 8 sequences to fit one
accelerator (memory above).
"""

from cfpo_jax.config import base_config

MODELS = {"0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "1.5b": "Qwen/Qwen2.5-1.5B-Instruct"}
MAX_CONCURRENT = {"0.5b": 512, "1.5b": 256}  # rows decoded at once: memory in the docstring


def get_config(arg: str = "0.5b"):
    if arg not in MODELS:
        raise ValueError(f"unknown model size {arg!r}; valid: {sorted(MODELS)}")
    c = base_config()
    c.workdir = f"runs/gsm8k_qwen_{arg}"
    c.model.path = MODELS[arg]
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = True

    c.data.source = "hf:openai/gsm8k:main:train"
    c.data.preset = "gsm8k"
    c.data.template = "chat"
    c.data.system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."
    c.data.batch_size = 64

    c.sampling.max_prompt_len = 256
    c.sampling.max_new_tokens = 512
    c.sampling.temperature = 1.0
    c.sampling.max_concurrent = MAX_CONCURRENT[arg]

    c.rewards.fns = ("gsm8k",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 4

    c.eval.sources = ("hf:openai/gsm8k:main:test",)
    c.eval.num_samples = 1
    c.eval.greedy = True
    c.eval.every_steps = 25
    c.eval.max_examples = 500

    c.rl.objective = "cfpo"
    c.rl.eps = 0.2
    c.rl.estimator = "grpo"
    c.rl.group_size = 8
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 2
    c.rl.micro_batch_size = 8
    c.rl.beta = 0.0

    c.optim.lr = 1e-6
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 200
    c.train.checkpoint_every = 20
    c.train.keep_checkpoints = 2
    c.train.export_hf = True
    return c
