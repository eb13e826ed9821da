r"""Qwen3-MoE policies: a tiny mixture of experts that learns on a CPU, and Qwen3-30B-A3B /
Qwen3-235B-A22B on MATH with CFPO, expert parallelism and routing replay.

Launch:
  python -m cfpo_jax.train --config=configs/math_qwen3_moe.py:tiny --workdir=runs/moe_tiny
  python -m cfpo_jax.train --config=configs/math_qwen3_moe.py:tiny --config.model.moe_routing=replay
  # TPU pod slice, every host the same command (launch/tpu_vm.sh); megablox experts on TPU:
  launch/tpu_vm.sh my-v5p-32 us-east5-a "--config=configs/math_qwen3_moe.py:30b-a3b --config.mesh.distributed=True \
      --config.model.moe_matmul=megablox --workdir=gs://my-bucket/runs/moe_30b"
  launch/tpu_vm.sh my-v5p-256 us-east5-a "--config=configs/math_qwen3_moe.py:235b-a22b --config.mesh.distributed=True \
      --config.model.moe_matmul=megablox --workdir=gs://my-bucket/runs/moe_235b"
  # 16 × H100 (2 nodes of 8): expert 4 × fsdp 4 and 256 sampler slots, the layout that fits (below)
  sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh --config=configs/math_qwen3_moe.py:30b-a3b \
      --config.mesh.expert=4 --config.sampling.max_concurrent=256 --workdir=/shared/runs/moe_30b

tiny: the quickstart (configs/quickstart.py: 1-digit addition, a 150-step warm start, then 300
CFPO steps) with the 2-layer decoder's MLP replaced by 8 experts of width 64, 2 per token
(Qwen3-MoE layout, q/k norm). Measured 2026-12-06 (branch issue33moe before its rebase onto the
trainer split, routing recomputed, no aux loss): the mean reward rose from 0.543 (first tenth of
the steps) to 0.987 (last tenth), greedy accuracy 1.00 on 200 held-out problems, and the export
wrote a Qwen3MoeForCausalLM directory. 8.5 min of CPU time (the quickstart: 2.5); the wall time,
74 min, says only how loaded the shared 2-core box was (load average 15–20 from other sessions
and this session's own test runs), not what an idle laptop takes.

30b-a3b (Qwen/Qwen3-30B-A3B: 48 layers, 128 experts of width 768, 8 per token, 30.5B parameters
of which 3.35B active) and 235b-a22b (Qwen/Qwen3-235B-A22B: 94 layers, 128 experts of width 1536,
8 per token, 235.1B parameters, 22.2B active): MATH train with math_qwen.py's recipe (CFPO ε = 0.2,
GRPO advantages, 1024 + 1024 tokens, lr 1e-6), bfloat16 compute over float32 master weights,
rematerialised layers, experts split over `mesh.expert` (8), 235b-a22b's widths over `tensor` (4),
everything else over fsdp; routing replay on (the learner runs the sampler's experts,
`model.moe_routing`), no load-balancing loss (the published routers are trained;
`rl.moe_aux_loss_coef` adds it). LoRA (`lora.rank` > 0) adapts attention only here — q, k, v, o;
a MoE layer has no dense gate/up/down, and the experts and the router get no adapters (they stay
frozen: tests/unit/models/test_moe.py::test_lora_training_on_a_moe_moves_only_the_adapters).

Compiled for the chips (benchmarks/compile.py, the run's own programs on compile-only devices of
the whole pod; benchmarks/README.md, "MoE configs on pods", 2026-12-07; per-chip GB = 1e9 bytes;
model FLOPs count the active parameters). Per-chip peak of each program:
  size       target                 update   prepare  prefill  decode
  30b-a3b    h100x8 (ragged_dot)   157.2 no     —        —        —      of 84.9 (expert 4)
  30b-a3b    h100x16 (ragged_dot)   74.5      27.5     40.1     29.0    of 84.9 (expert 4, 256 slots)
  30b-a3b    h100x16 (ragged_dot)   86.3 no   29.6    97.6 no   33.7    of 84.9 (expert 8, 1024 slots)
  30b-a3b    v5p-16 (megablox)     >95.7 no     —        —       52.4    of 102 (update: HLO temps 109.5)
  30b-a3b    v5p-32 (megablox)      73.3      19.5     33.3     57.3    of 102
  235b-a22b  v5p-256 (megablox)     72.2      20.8     30.5     45.5    of 102
  235b-a22b  v5p-128 (megablox)    >95.7 no     —        —        —      of 102 (update: HLO temps 103.5)
Smallest slices: 16 H100s for 30b-a3b (8 do not hold its update), a v5p-256 for 235b-a22b (a
v5p-128 does not); for 30b-a3b on TPU a v5p-32, every program compiled and fitting (with the 31.1 GB
of training state resident beside the sampler, a run holds 57.3 + 31.1 = 88.4 GB per chip); a
v5p-16 runs out of HBM in the update. A lower bound on one RL step there (every completion 1,024
tokens long; each program's max(FLOPs / peak, bytes / bandwidth) times its calls): ≥ 270 s from
the compiled programs, ≥ 290 s with the model FLOPs in place of the compiled count where larger
(megablox's FLOPs are inside the kernel) — a bound, not a time; per update call ≥ 7.2 s.
235b-a22b on a v5p-256 (fsdp 4 × expert 8 × tensor 4): the update 72.2 GB per chip (27.5 GB of
state); ≥ 5.9 s per update call from its model FLOPs (2.73e15 per chip); prepare 20.8, prefill
30.5 and decode 45.5 GB per chip, every program fitting (with the state resident beside the
sampler, 45.5 + 27.5 = 73.0 GB). "—": not
compiled (CPU time on a shared 2-core host; one command each, benchmarks/README.md).
16 H100s: every program fits with `--config.mesh.expert=4 --config.sampling.max_concurrent=256`
(the sbatch line above; benchmarks/README.md, "30b-a3b on 16 H100s", 2026-12-07). The config's own
layout (expert 8 × fsdp 2, 1024 slots) does not: update 86.3 and prefill 97.6 GB of 84.9. Why the
other layout fits: parameters that are not experts (1.5B: attention, embeddings) are replicated
over `expert` and split over fsdp only, so fsdp 4 instead of 2 holds 4.6 GB less of their float32
state per GPU (update arguments 26.5 GB instead of 31.1); and the prefill's largest batch follows
the slots (64 prompts instead of 256), a quarter of the temporaries. With the training state
resident beside the sampler a run holds at most 40.1 + 26.5 = 66.6 GB per GPU (prefill) — a
conservative sum. XLA lowers `jax.lax.ragged_dot` densely on the GPU (every local expert on every
routed row), so its FLOPs and temporaries do not shrink with more expert parallelism (the tokens
gathered per expert shard grow by the factor the local experts shrink): compiled FLOPs are 93 ×
the model's for the update, 139 × for prepare, 68–70 × for prefill and decode, and a lower bound
on one RL step from these programs is ≥ 2,037 s (FLOPs alone) — it fits, but a grouped GEMM that
computes only the routed rows (jax's Mosaic GPU ragged_dot kernels; not wired in) is what would
make it fast. On TPU megablox computes only the routed rows (its FLOPs are inside the kernel, not
in the compiled count).
"""

import importlib.util
import os

from cfpo_jax.config import base_config

# The micro-batch must split over the data × fsdp × expert shards: 16 on a v5p-32 (16 chips) or
# 16 H100s, 32 on a v5p-256 with 235b-a22b's tensor = 4 (1 sequence per chip). 1024 slots keep
# the KV cache per chip at 13 GB on a v5p-32 (64 slots of 48 layers × 2048 columns) and 3.2 GB
# on a v5p-256. The sampler's bf16 copy keeps the expert and tensor splits and drops fsdp
# (`decoding._sampling_spec`): 235b-a22b's experts (454 GB in bf16) are 57 GB per chip over
# expert = 8 alone, 14 GB with tensor = 4 splitting each expert's width too.
SIZES = {
    "30b-a3b": dict(path="Qwen/Qwen3-30B-A3B", micro_batch_size=16, max_concurrent=1024),
    "235b-a22b": dict(path="Qwen/Qwen3-235B-A22B", micro_batch_size=32, max_concurrent=1024, tensor=4),
}
VALID = ("tiny", *SIZES)
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def _quickstart():
    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str = "tiny"):
    if arg not in VALID:
        raise ValueError(f"unknown size {arg!r}; valid: {list(VALID)}")
    if arg == "tiny":
        c = _quickstart()
        c.workdir = "runs/moe_tiny"
        c.model.tiny.num_experts = 8
        c.model.tiny.num_experts_per_tok = 2
        c.model.tiny.moe_intermediate_size = 64
        return c
    size = SIZES[arg]
    c = base_config()
    c.seed = 0
    c.workdir = f"runs/math_qwen3_moe_{arg}"

    c.model.path = size["path"]
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.moe_routing = "replay"

    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, 8, size.get("tensor", 1)

    c.data.source = "hf:DigitalLearningGmbH/MATH-lighteval:train"
    c.data.preset = "math"
    c.data.template = "chat"
    c.data.system_prompt = SYSTEM_PROMPT
    c.data.user_template = "{question}"
    c.data.batch_size = 1024
    c.data.seed = 0

    c.sampling.max_prompt_len = 1024
    c.sampling.max_new_tokens = 1024
    c.sampling.temperature = 1.0
    c.sampling.max_concurrent = size["max_concurrent"]

    c.rewards.fns = ("math",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 16
    c.rewards.timeout_s = 5.0

    c.eval.sources = ("hf:HuggingFaceH4/MATH-500:test",)
    c.eval.num_samples = 4
    c.eval.ks = (1, 4)
    c.eval.every_steps = 10

    c.rl.objective = "cfpo"
    c.rl.eps = 0.2
    c.rl.estimator = "grpo"
    c.rl.group_size = 5
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 4
    c.rl.micro_batch_size = size["micro_batch_size"]
    c.rl.beta = 0.0
    c.rl.moe_aux_loss_coef = 0.0

    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 100
    c.train.checkpoint_every = 10
    c.train.keep_checkpoints = 3
    c.train.export_hf = True
    return c
