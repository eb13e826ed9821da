r"""The paper's alignment setting: Llama-3-8B SFT policy, a learned reward model, RLOO advantages with
the KL penalty in the reward (β = 1e-4), CFPO against the clipped objective.

Launch (GPU node, 8 × 80 GB; see launch/gpu.sh):
  python -m cfpo_jax.train --config=configs/align_llama.py --workdir=runs/align_cfpo
  # the clipped (RLOO-PPO) baseline of the comparison: same everything, clipped objective
  python -m cfpo_jax.train --config=configs/align_llama.py --config.rl.objective=ppo \
      --workdir=runs/align_clip
  # the alignment tax: lm-eval tasks on the SFT policy (before) and the trained one (after)
  pip install -e '.[eval]'
  python -m cfpo_jax.evaluate --config=configs/align_llama.py --config.eval.checkpoint=runs/align_cfpo/hf
Launch (TPU VM / pod slice, every host runs the same command; see launch/tpu_vm.sh):
  launch/tpu_vm.sh my-tpu us-central2-b "--config=configs/align_llama.py --config.mesh.distributed=True"
  # one TPU VM: a v5p-8 as above; a v6e-8 (32 GiB chips) with its memory knobs (SLICES below)
  python -m cfpo_jax.train --config=configs/align_llama.py:v6e --workdir=runs/align_cfpo
Launch, Llama-3.1-70B-Instruct as the policy (`70b`: 8-way tensor parallelism inside a host, FSDP
over the rest; the reward model stays Skywork's 8B), every host the same command:
  launch/tpu_vm.sh my-v5p-128 us-east5-a "--config=configs/align_llama.py:70b --config.mesh.distributed=True \
      --workdir=gs://my-bucket/runs/align_70b"
  sbatch --nodes=8 --gpus-per-node=8 launch/slurm.sh --config=configs/align_llama.py:70b \
      --workdir=/shared/runs/align_70b                                  # 64 × H100
70b compiled for pods (issue 33; benchmarks/README.md, 2026-12-06; the whole pod's compile-only
devices, many hosts; per-chip GB = 1e9 bytes): on 64 × H100 (fsdp 8 × tensor 8) the update peaks
at 31.0 GB (17.7 of arguments: the policy's float32 master shard and Adam moments, the bf16
reference's shard), the prepare pass (old-logprob and reference forwards) at 12.2, the prefill at
30.5, the decode at 25.7, the reward model's forward at 0.9 (cuDNN attention, the Pallas decode
kernel); while sampling, 30.5 + 17.7 of state ≈ 48.1 of 84.9. On a
v5p-128 (64 chips, the same mesh; splash and paged attention) update 39.1, prepare 11.4, prefill
27.1, decode 27.2, reward forward 1.2 GB per chip; while sampling 27.2 + 17.7 ≈ 44.8 of 102.
Compiled FLOPs per chip: 1.21 × the model's for the update (remat), 0.93–0.99 for the forwards.
On a v6e-256 (256 chips of 32 GB; fsdp 32 × tensor 8, `--config.rl.micro_batch_size=32` so the
micro-batch splits over the 32 batch shards; 2026-12-07) only the prepare pass was compiled: 3.1 GB
per chip, FLOPs 0.98 × the model's, bound ≥ 3.7 s per call; the rest not yet.
A lower bound on one RL step on the v5p-128 from its compiled programs (each program's
max(FLOPs / peak, bytes / bandwidth) times its calls per step, every completion 1,024 tokens long
— a bound, not a time): ≥ 115 s (8 updates 55 s, prepare 30 s, 2,070 decode steps of ≥ 13.3 ms
over ≈ 760 slots 28 s, 24 reward-model calls 2 s). On 64 × H100, from FLOPs alone (the GPU compiler
reports no bytes, so decode steps are bounded by their FLOPs only): ≥ 44 s. Smallest it fits: 32 × H100
(update 61.8 GB, prefill 28.0 + 35.3 of state = 63.2 of 84.9); on 16 the state alone is ≈ 70.6 GB
beside a 28 GB sampler (from these figures, not compiled). On TPU the v5p-128 is the smallest
compiled; a v5p-64 has the 32 H100s' per-chip layout with 102 GB chips (not compiled here).

Hardware: one node of 8 × 80 GB GPUs (H100/A100), a v5p-8, or a v6e-8 with `:v6e` (compiled
for each, below). Memory: the 8B
policy with float32 master weights and Adam moments is 16 B/param = 128 GB, the bfloat16 reference
and reward model 16 GB each, all FSDP-sharded over 8 devices ≈ 20 GB per device before activations
(remat on, micro-batches of 8 sequences of ≤ 2048 tokens).

Compiled for the real chips (benchmarks/compile.py, the GPU compiler on compile-only devices,
per-chip GB = 1e9 bytes; benchmarks/README.md, 2026-12-03 second session): on 8 × H100 (8-way
FSDP) the update peaks at 26.2 GB (16.1 GB of arguments: the policy's float32 master shard and Adam
moments), the prepare pass (old-logprob and reference forwards) at 11.7 GB, the sampler's prefill
at 26.1 GB and decode at 23.9 GB (its slots from the default 8 GB per-device budget of keys and
values), the reward model's forward at 4.1 GB; cuDNN attention and the Pallas decode kernel in the
HLO. Smallest target it fits: h100x8 — while sampling, the training state (16.1 GB) and the
reference and reward models' shards (≈ 2 GB each) stay resident: ≈ 46 GB at most.
On a v5p-8 (4 chips, 4-way FSDP; 2026-12-03 second session, 7B-class on TPU) it fits as
configured: update peak 63.1 GB per chip of 102.0 (32.1 GB of arguments), prepare 22.0, prefill
23.6, decode 25.5, reward forward 6.0 GB; splash and paged attention in the HLO; with the state
resident while sampling, decode 25.5 + 32.1 = 57.6 GB, plus the reward model's shard (3.75 GB,
the reward row's arguments) and the reference model's, well within 102.
On a v6e-8 (8-way FSDP, same session) each program fits alone (update 31.5 GB per chip of 34.4,
16.1 GB of arguments; prepare 11.4, prefill 23.9, decode 24.2, reward 4.7 GB) but not with the
state resident while sampling: 24.2 + 16.1 = 40.3 GB > 34.4 — the sampler's bf16 copy of the
policy is 16 GB on every chip under FSDP. So `align_llama.py:v6e` (2026-12-03 third session;
the same run and maths) splits that copy and the KV cache 4 ways by tensor parallelism (mesh
fsdp 2 × tensor 4), with micro-batches of 4 and a 6 GB per-chip KV budget: update 31.7 GB per chip
(16.1 of arguments), prepare 10.4, prefill 11.3, decode 10.1, reward forward 5.7; while sampling,
11.3 + 16.1 of state + the reference and reward models' shards (2.0 + 1.9) ≈ 31.3 GB of 34.4 —
it fits a v6e-8. Smallest TPU targets it fits: v5p-8 as configured, v6e-8 with `:v6e`.

Expected run time — computed, not measured (no GPU run of this config has been made): ≈ 2 min per
RL step on 8 × H100, ≈ 3.5 h for the 100 steps. Basis: a step has 192 × 8 = 1536 responses of up
to 1024 + 1024 tokens (≈ 2.3M tokens at an assumed mean of 1500); learning (rematted forward +
backward, 8·N FLOPs/token), the reference and old-logprob forwards (2·N each) and the reward-model
forward (2·N) come to ≈ 14·8e9·2.3e6 ≈ 2.6e17 FLOPs, ≈ 80 s at an assumed 40 % of the 8 × 989
TFLOP/s bfloat16 peak; decoding 1024 steps for 192 rows per GPU reads the 16 GB of weights plus
≈ 37 GB of KV cache per step, ≈ 16 ms at 3.35 TB/s, ≈ 20 s per step. The lm-eval tasks of the
alignment tax are not included.

Where the choices come from:
  * RLOO advantages, β = 1e-4, KL in the reward (not a loss term), CFPO vs the clipped objective
    with ε = 0.2: the paper (arXiv 2601.22801, alignment setting; its code builds on OpenRLHF).
  * Policy `OpenRLHF/Llama-3-8b-sft-mixture`, prompts `OpenRLHF/prompt-collection-v0.1` (the
    last user turn of `context_messages`, in the policy's chat template), prompt/response length
    1024/1024, 192 prompts × 8 samples per rollout, train batch 192 samples (hence 8 minibatches),
    micro-batch 8, learning rate 5e-7: OpenRLHF's Llama-3-8B example scripts
    (examples/scripts/train_reinforce_baseline_llama_ray_agent_async.sh; RLOO is its
    `--advantage_estimator rloo`). The KL estimator for the reward is k1, OpenRLHF's default.
    The paper's exact policy, reward model and batch sizes are not confirmed here: override them
    if its appendix says otherwise.
  * Reward model `Skywork/Skywork-Reward-Llama-3.1-8B-v0.2`: a public
    LlamaForSequenceClassification (one label) on the Llama-3 tokenizer and chat template, which
    `rm:` loads as it is. OpenRLHF's own example RM (`OpenRLHF/Llama-3-8b-rm-700k`) is the other
    candidate; it loads here only if its checkpoint is a standard *ForSequenceClassification.
  * lm-eval tasks for the alignment tax: arc_easy, hellaswag, winogrande (the issue's list).
"""

from cfpo_jax.config import base_config


# Per slice, the memory knobs (the run and its maths are the same): "" for 8 × 80 GB GPUs or a
# v5p-8; "v6e" for a v6e-8 (32 GiB chips), where the sampler's bf16 copy of the 8B policy (16 GB
# on every chip under FSDP) does not fit beside the 16 GB of training state: 4-way tensor
# parallelism splits that copy and the KV cache, FSDP takes the other 2 ways; micro-batches of 4
# (the update's activations) and a 6 GB per-chip KV budget leave room for the reference and
# reward models' shards while sampling (docstring).
# "70b": the same run with Llama-3.1-70B-Instruct as the policy (and its reference), on a pod (a
# v5p-128 or 64 × H100): its sampler's bf16 copy (141 GB) is split 8 ways by tensor parallelism
# (inside one host of 8 GPUs), FSDP takes the rest; the reward model stays the 8B one.
SLICES = {
    "": dict(fsdp=-1, tensor=1, micro_batch_size=8, kv_cache_gb=8.0),
    "v6e": dict(fsdp=2, tensor=4, micro_batch_size=4, kv_cache_gb=6.0),
    "70b": dict(fsdp=-1, tensor=8, micro_batch_size=8, kv_cache_gb=8.0,
                path="meta-llama/Llama-3.1-70B-Instruct"),
}


def get_config(arg: str = ""):
    if arg not in SLICES:  # the CFPO/clipped comparison is the rl.objective override above
        raise ValueError(f"unknown slice {arg!r}; valid: {sorted(SLICES)}")
    slice_knobs = SLICES[arg]
    c = base_config()
    c.seed = 0
    c.workdir = "runs/align_llama"

    c.model.path = slice_knobs.get("path", "OpenRLHF/Llama-3-8b-sft-mixture")
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"
    c.model.remat = True

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, slice_knobs["fsdp"], slice_knobs["tensor"]

    c.data.source = "hf:OpenRLHF/prompt-collection-v0.1:train"
    c.data.preset = "prompt_collection"
    c.data.template = "chat"
    c.data.system_prompt = ""
    c.data.user_template = "{question}"
    c.data.batch_size = 192
    c.data.seed = 0

    c.sampling.max_prompt_len = 1024
    c.sampling.max_new_tokens = 1024
    c.sampling.temperature = 1.0
    c.sampling.top_p = 1.0
    c.sampling.top_k = 0
    c.sampling.kv_cache_gb = slice_knobs["kv_cache_gb"]  # per chip; the sampler fits its slots to it

    c.rewards.fns = ("rm:Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",)
    c.rewards.weights = (1.0,)
    c.rewards.rm_max_len = 2304  # 1024 + 1024 tokens and the reward model's template around them
    c.rewards.rm_batch_size = 64
    c.rewards.rm_dtype = "bfloat16"

    c.eval.sources = ()
    c.eval.lm_eval_tasks = ("arc_easy", "hellaswag", "winogrande")
    c.eval.lm_eval_batch_size = 32

    c.rl.objective = "cfpo"  # the comparison: --config.rl.objective=ppo
    c.rl.eps = 0.2
    c.rl.level = "token"
    c.rl.agg = "token-mean"
    c.rl.estimator = "rloo"
    c.rl.group_size = 8
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 8
    c.rl.micro_batch_size = slice_knobs["micro_batch_size"]
    c.rl.beta = 1e-4
    c.rl.kl_estimator = "k1"
    c.rl.kl_in_reward = True

    c.optim.lr = 5e-7
    c.optim.warmup_steps = 5
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 100
    c.train.log_every = 1
    c.train.checkpoint_every = 10
    c.train.keep_checkpoints = 3
    c.train.export_hf = True
    return c
