r"""The paper's reasoning setting: Qwen2.5-{1.5B,3B,7B}-Instruct on MATH train, CFPO, eval MATH500 + GSM8K.

Launch (GPU node, 8 × 80 GB; see launch/gpu.sh):
  python -m cfpo_jax.train --config=configs/math_qwen.py:1.5b --workdir=runs/math_qwen_1.5b
  # the paper's off-policy sweep: iterations μ and batch ratio
  python -m cfpo_jax.train --config=configs/math_qwen.py:7b --config.rl.num_epochs=4 \
      --config.rl.num_minibatches=8 --workdir=runs/math_qwen_7b_mu4
  # GRPO baseline for the comparison: same everything, clipped objective
  python -m cfpo_jax.train --config=configs/math_qwen.py:1.5b --config.rl.objective=ppo
Launch (TPU VM / pod slice, every host runs the same command; see launch/tpu_vm.sh):
  launch/tpu_vm.sh my-tpu us-central2-b "--config=configs/math_qwen.py:7b --config.mesh.distributed=True"
  # one TPU VM: a v5e-8 (16 GiB chips), a v6e-8 (32 GiB) or a v5p-8 (4 chips of 95 GiB)
  python -m cfpo_jax.train --config=configs/math_qwen.py:1.5b-v5e --workdir=runs/math_qwen_1.5b
  python -m cfpo_jax.train --config=configs/math_qwen.py:7b-v6e --workdir=runs/math_qwen_7b
  python -m cfpo_jax.train --config=configs/math_qwen.py:7b-v5p --workdir=runs/math_qwen_7b
The -v5e/-v6e/-v5p sizes are the same run and maths (results do not depend on either knob) with
the memory knobs of that slice: micro-batch and the sampler's slots (SIZES below).
Launch, Qwen2.5-32B-Instruct on a pod (`32b`: 8-way tensor parallelism inside a host, FSDP over
the rest; every host runs the same command):
  launch/tpu_vm.sh my-v5p-64 us-east5-a "--config=configs/math_qwen.py:32b --config.mesh.distributed=True \
      --workdir=gs://my-bucket/runs/math_qwen_32b"
  # two v5p-64 slices over DCN (Multislice): the data axis spans the slices
  ... "--config=configs/math_qwen.py:32b --config.mesh.distributed=True --config.mesh.dcn=2 ..."
  # 16 × H100 (2 nodes of 8)
  sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh --config=configs/math_qwen.py:32b \
      --workdir=/shared/runs/math_qwen_32b

Expected run time on 8 × H100 (an estimate, not yet measured end to end): 1.5b ≈ 2–3 min per RL
step, ≈ 4–5 h for the 100 steps; 3b about twice that; 7b ≈ 10–12 min per step, ≈ 18–20 h. Basis:
each step samples 5120 completions of up to 1024 tokens (5.2M tokens; benchmarks/README.md measured
18.5k tokens/s per H100 for the 1.5B shape at 512 new tokens, taken here as ~10k at 1024 + 1024
for the longer cache, so ≈ 65 s over 8 GPUs) and then runs one logprob forward plus one rematted
forward/backward over 10.5M tokens (≈ 1.6e17 FLOPs at ~300 TFLOP/s per GPU ≈ 65 s); the
evaluation every 10 steps adds ≈ 1.5 min (1.5b).

Compiled for the real chips (benchmarks/compile.py: the run's own programs, GPU/TPU compilers on
compile-only devices; per-chip GB = 1e9 bytes, measured by the compiler; benchmarks/README.md,
2026-12-03 and its second session). Per-chip peak of each program, and "run": the most a run
holds at once, counting the training state (the update's arguments) resident beside every other
program — a conservative sum:
  size      target  update  old-logprob  prefill  decode   run         kernels
  1.5b      h100x8   13.0      2.9        35.9     33.8    38.2 of 84.9  cuDNN, Pallas decode
  3b        h100x8   13.5      3.5        46.3     45.5    50.9 of 84.9  cuDNN, Pallas decode
  7b        h100x8   21.7      6.4        48.1     45.7    59.6 of 84.9  cuDNN, Pallas decode
  1.5b-v5e  v5e-8    13.6      3.5        13.0      7.3    15.3 of 17.2  splash, paged
  7b-v6e    v6e-8    28.9      7.4        19.1     20.3    31.7 of 34.4  splash, paged
  7b-v5p    v5p-8    55.8     13.6        49.9     46.7    72.7 of 102   splash, paged
Smallest target each fits: h100x8 for 1.5b, 3b and 7b as configured (one H100 was not compiled);
a v5e-8 for 1.5b-v5e, a v6e-8 for 7b-v6e, a v5p-8 for 7b-v5p. As configured, 1.5b does not fit a
v5e-8 (update 18.3 GB of 17.2; the 512-slot sampler ran out of HBM) and 7b does not fit a v5p-8
(prefill 83.6 GB + 22.9 GB of training state > 102 GB; its decode ran out of HBM before commit
68c11c6, and needs 77.1 GB + 22.9 after it), nor a v6e-8 (its 256 slots per chip are 30 GB of
keys and values beside 15 GB of bf16 weights, from the shapes; not compiled). Commit 68c11c6 (the decode step's cache write) removed a copy of the whole KV
cache per decode step on TPU; the TPU decode figures above are after it, the 3b and 7b h100x8
ones before it (on the GPU it changed nothing: 1.5b's decode recompiled after it, 33.8 GB again).
The compiled matmul FLOPs per chip are 1.1 × the model FLOPs for the 7b's update on TPU as on the
H100s (the rematted forward; benchmarks/README.md, third session — the 1.9–2.8 × recorded before
was a miscount of the TPU's HLO, since fixed).

32b on pods (issue 33; benchmarks/README.md, 2026-12-06, the run's programs compiled for
compile-only devices of the whole pod, many hosts; per-chip GB = 1e9 bytes):
  target              update  prepare  prefill  decode  run          kernels
  v5p-64 (32 chips)    32.5     6.5     17.7     16.8    30.0 of 102   splash, paged
  h100x16 (2 hosts)    49.6    11.6     17.5     16.2    42.1 of 84.9  cuDNN, Pallas decode
  v5p-64x2 (2 slices)  30.7     6.4     24.0     16.8    36.3 of 102   splash, paged
("run": the sampler's peak + the training state resident, 12.3 and 24.6 GB.) Over two v5p-64
slices (`--config.mesh.dcn=2`) the state is the same 12.3 GB per chip — FSDP stays inside a slice,
the slices hold replicas and exchange only the gradients' reduction — and the update's FLOPs per
chip halve. Compiled FLOPs per chip are 1.19 × the model's for the update (rematted forward),
0.94–0.98 for the forwards. A lower bound on one RL step from the compiled programs (every
completion 1,024 tokens long; each program's max(FLOPs / peak, bytes / bandwidth) times its calls
per step — a bound, not a time): ≥ 314 s on the v5p-64 (4 updates 167 s, old-logprob pass 45 s,
11,015 decode steps of ≥ 8.9 ms over 476 slots 98 s), ≥ 156 s over two v5p-64 slices (half the
work per chip), ≥ 222 s on 16 H100s (FLOPs alone: the GPU compiler reports no bytes, so its
22,029 decode steps over 238 slots are bounded by their FLOPs only, 0.96 ms each).
Smallest it fits: 16 × H100 (compiled above). On 8 × H100 the update does not fit (94.1 GB per
GPU at micro-batch 8, 87.9 at 4, of 84.9: 49.2 GB of state and a whole float32 gradient shard,
with tensor = 8 leaving no FSDP to split them). On TPU the v5p-64 is the smallest compiled; it
leaves 3 × headroom, and a v5p-32 has the per-chip layout of the 16 H100s above (fsdp 2 × tensor
8) with 102 GB chips — not compiled here (a program of this size took 10–13 minutes of this
box's CPU share).
On a v6e-64 (64 chips of 32 GB, fsdp 8 × tensor 8; 2026-12-07) only the prepare pass was
compiled: 3.3 GB per chip, FLOPs 0.96 × the model's, bound ≥ 11.3 s per call; the rest not yet.

Disaggregated (issue 32: `mesh.rollout_devices`, the first host the rollout mesh, the second the
learner mesh; benchmarks/compile.py --side, benchmarks/README.md, 2026-12-06): 7b's programs
compiled on each half of the pod, per-chip peak GB (nothing else resident on a half; the weight
move between them, benchmarks/async_rl.py compile, 22.85 on the v5p-16, 7.62 on the H100s):
  target                 rollout: prefill  decode   learner: update  prepare
  v5p-16 (2 × 4 chips)            83.6      77.4             55.8     13.6   of 102
  h100x16 (2 × 8 GPUs)            48.1      45.5             21.7      6.4   of 84.9
So 7b as configured, which does not fit a colocated v5p-8, fits a v5p-16 disaggregated, program by
program (the weight move beside a live decode would be 77.4 + 22.9 = 100.3 GB: tight).

Sampling memory per GPU (8-way FSDP, tensor = 1; sampling.max_concurrent rows over the 8 GPUs,
so max_concurrent / 8 slots each; cfpo_jax.sampling): every slot holds keys and values for
2,048 cache columns (1,024-token prompt bucket + 1,024 new, rounded up to the Pallas kernel's 128)
= 2 × layers × kv heads × 2,048 × 128 × 2 bytes (bf16); the weights are gathered once per rollout
into a bf16 copy (params × 2 bytes) beside the fp32 master shard and Adam moments (params × 12 / 8):
  size  params  master+Adam  bf16 copy  KV per slot  slots/GPU  KV cache  prefill*  total
  1.5b  1.54B     2.3 GB      3.1 GB     58.7 MB       512     30.1 GB   ~2 GB    ~38 GB of 80
  3b    3.09B     4.6 GB      6.2 GB     75.5 MB       512     38.7 GB   ~3 GB    ~53 GB of 80
  7b    7.62B    11.4 GB     15.2 GB    117.4 MB       256     30.1 GB   ~5 GB    ~62 GB of 80
  (* the prefill of ≤ 16 prompts of 1,024 tokens at a time: one layer's float32 attention scores,
  16 × heads × 1,023² × 4 bytes, plus its MLP activations; decode logits are 0.6 MB per slot.)
The rollout of 640 rows per GPU runs through those slots (continuous batching); with the slots of
all 640 rows at once the 7b KV cache alone would be 75 GB. Figures computed from the shapes
(cfpo_jax.sampling.kv_bytes_per_slot), not measured on a GPU yet.

Where the numbers come from:
  * CFPO with ε = 0.2, β = 0 (no reference model), group-relative (GRPO) advantages, token-mean
    aggregation: the paper (arXiv 2601.22801, reasoning setting).
  * `rl.num_epochs` is the paper's "iterations" μ and `rl.num_minibatches` its "batch ratio"
    (rollout batch / optimiser minibatch); 1 × 4 here, the baseline of the sweep.
  * Prompt/response length 1024/1024, 1024 prompts per step, 5 samples per prompt, minibatch 256
    prompts (hence num_minibatches = 4), learning rate 1e-6, Qwen2.5-Instruct with its chat
    template: verl's GRPO example on MATH (examples/grpo_trainer/run_qwen2_5-7b_math.sh), the
    usual reference setup for these models. Warmup 10 updates and weight decay 0.01 (verl's AdamW
    defaults). Not checked against the paper's appendix: override if it states otherwise.
"""

from cfpo_jax.config import base_config

SIZES = {
    "1.5b": dict(path="Qwen/Qwen2.5-1.5B-Instruct", micro_batch_size=64, max_concurrent=4096),
    "3b": dict(path="Qwen/Qwen2.5-3B-Instruct", micro_batch_size=32, max_concurrent=4096),
    "7b": dict(path="Qwen/Qwen2.5-7B-Instruct", micro_batch_size=16, max_concurrent=2048),
}
# A TPU v5e-8 (16 GiB per chip): half the micro-batch (the update's activations), and sampler
# slots from a 4 GB per-chip budget of keys and values (max_concurrent 0) instead of 512 per chip.
SIZES["1.5b-v5e"] = dict(SIZES["1.5b"], micro_batch_size=32, max_concurrent=0, kv_cache_gb=4.0)
# A TPU v6e-8 (32 GiB per chip): the 7b's 256 slots per chip (30 GB of keys and values) do not fit
# beside its bf16 sampling copy (15 GB); the same 4 GB per-chip budget of slots does.
SIZES["7b-v6e"] = dict(SIZES["7b"], max_concurrent=0, kv_cache_gb=4.0)
# A TPU v5p-8 (4 chips of 95 GiB): the 7b's 2048 rows at once would be 512 slots per chip; 1024
# keeps 8 × H100's 256 per chip.
SIZES["7b-v5p"] = dict(SIZES["7b"], max_concurrent=1024)
# Qwen2.5-32B on a pod (a v5p-64, two v5p-64 slices with --config.mesh.dcn=2, or 16 × H100): its
# sampler's bf16 copy (66 GB) fits no chip whole beside the training state, so 8-way tensor
# parallelism (inside one host of 8 GPUs) splits that copy and the KV cache, FSDP takes the rest.
SIZES["32b"] = dict(path="Qwen/Qwen2.5-32B-Instruct", micro_batch_size=8, max_concurrent=0,
                    kv_cache_gb=8.0, tensor=8)

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def get_config(arg: str = "1.5b"):
    if arg not in SIZES:
        raise ValueError(f"unknown size {arg!r}; valid: {sorted(SIZES)}")
    size = SIZES[arg]
    c = base_config()
    c.seed = 0
    c.workdir = f"runs/math_qwen_{arg}"

    c.model.path = size["path"]
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"
    c.model.remat = True

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, size.get("tensor", 1)

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
    c.sampling.top_p = 1.0
    c.sampling.top_k = 0
    c.sampling.max_concurrent = size["max_concurrent"]  # over 8 GPUs; memory above
    c.sampling.kv_cache_gb = size.get("kv_cache_gb", c.sampling.kv_cache_gb)

    c.rewards.fns = ("math",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 16
    c.rewards.timeout_s = 5.0

    c.eval.sources = ("hf:HuggingFaceH4/MATH-500:test", "hf:openai/gsm8k:main:test")
    c.eval.num_samples = 4
    c.eval.ks = (1, 4)
    c.eval.greedy = False
    c.eval.every_steps = 10
    c.eval.max_examples = 0

    c.rl.objective = "cfpo"
    c.rl.eps = 0.2
    c.rl.level = "token"
    c.rl.agg = "token-mean"
    c.rl.estimator = "grpo"
    c.rl.group_size = 5
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 4
    c.rl.micro_batch_size = size["micro_batch_size"]
    c.rl.beta = 0.0
    c.rl.kl_estimator = "k3"

    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 100  # verl's 15 epochs of 7.5k MATH problems at 1024/step ≈ 110 steps
    c.train.log_every = 1
    c.train.checkpoint_every = 10
    c.train.keep_checkpoints = 3
    c.train.export_hf = True
    return c
