r"""GSM8K with Qwen2.5-7B-Instruct, CFPO and LoRA (rank 64 on every projection): one 80 GB GPU.

Launch (the memory fraction lets JAX use the whole card instead of its default 75%):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m cfpo_jax.train --config=configs/gsm8k_qwen_lora.py \
      --workdir=runs/gsm8k_qwen_lora
  # with a KL penalty; the reference is the base with its adapters off (no second copy):
  python -m cfpo_jax.train --config=configs/gsm8k_qwen_lora.py --config.rl.beta=0.04

Expected run time on one H100 (an estimate, not measured: no GPU was available when this was
written): ≈ 100 s per RL step, ≈ 6 h for the 200 steps. Basis: sampling 64 × 8 completions of up
to 512 tokens reads the 15.2 GB of weights and the valid cache once per decode step (≈ 12 ms at
the H100's 2.4 TB/s; the sampler reached 20-25% of that roofline on the 0.5B/1.5B shapes in
benchmarks/README.md) ≈ 25 s; learning is one logprob forward plus a rematted forward/backward
over 512 × 768 tokens, ≈ 2.4e16 FLOPs (a frozen base needs no weight gradients) ≈ 60-80 s at
300-400 TFLOP/s. benchmarks/train_step.py's LoRA row (7B, rank 64) is still to be taken.

Compiled for the real chips (benchmarks/compile.py, the GPU compiler on compile-only devices,
per-chip GB = 1e9 bytes; benchmarks/README.md, 2026-12-03 second session): on one H100 the LoRA
update peaks at 28.1 GB (17.2 GB of arguments: the bf16 base, the adapters and their Adam moments),
the old-logprob pass at 18.5 GB, the sampler's prefill at 39.6 GB and decode at 39.1 GB (the 512
slots' KV cache in their arguments); cuDNN attention (forward and backward) and the Pallas decode
kernel in the HLO. Smallest target it fits: h100x1 — while sampling, the training state stays
resident beside the sampler's program: at most 17.2 + 39.6 ≈ 57 GB (less where the sampler's
weights are the base's own buffers).
On a v5e-8 (2026-12-03 second session, continued) it does not fit: the learner does (update peak
8.3 GB, old-logprob pass 4.4 GB per chip of 17.2), but the gather of the sampler's bf16 weights ran
out of HBM in the TPU compiler (21.27G of temporaries, 15.75G available): no prefill or decode.
On a v5p-8 (4-way FSDP; 2026-12-03 second session, 7B-class on TPU) it fits as configured: LoRA
update peak 13.0 GB per chip of 102.0 (5.3 GB of arguments), old-logprob pass 6.6, prefill 20.7,
decode 22.3 GB; with the state resident while sampling, 22.3 + 5.3 = 27.7 GB.
On a v6e-8 (8-way FSDP; learner same session, sampler the third session) it fits as configured:
update 8.3 GB per chip of 34.4 (3.4 GB of arguments), old-logprob pass 4.4, prefill 17.3, decode
19.4 GB; with the state resident while sampling, 19.4 + 3.4 = 22.8 GB. Smallest TPU target it
fits: v6e-8 (and v5p-8).

Memory on one H100 (80 GB, 79 GiB usable), from the shapes (`jax.eval_shape` of this model):
  persistent
    frozen base, bfloat16 (7.62e9 parameters)                              14.2 GiB
    adapters, float32 (1.61e8 parameters: rank 64 on q k v o gate up down)    0.6 GiB
    their Adam moments (2 × float32); gradients (float32) while learning      1.8 GiB
  while sampling (freed before learning)
    KV cache: 512 rows × 767 slots × 28 layers × 2 × 4 kv heads × 128 × 2 B  21.0 GiB
    (lora.merge_for_sampling would add the merged kernels, 12.2 GiB)
  while learning, a minibatch of 256 sequences × 768 tokens in micro-batches of 16, remat on:
    XLA's compiled memory analysis of this update (abstract inputs, CPU, 2026-11-23) gives
    46.4 GiB of temporaries at micro-batch 16 and 38.0 GiB at 8, of which about 28.4 GiB are
    float32 copies of the frozen kernels that XLA:CPU makes because it has no bfloat16 matmul
    (they are in the CPU program; a GPU multiplies bfloat16 directly): ≈ 18 GiB of activations
    at micro-batch 16 (1.1 GiB per sequence, CPU's einsum attention included).
  peak ≈ 16.6 + max(21.0 sampling, ≈ 18 learning) ≈ 38 GiB, an estimate until
  benchmarks/train_step.py's LoRA row is measured on a GPU. Full fine-tuning would need float32
  weights, gradients and two Adam moments (113 GiB) before any activation, plus a reference
  copy when β > 0.

Numbers: as configs/gsm8k_qwen.py (CFPO ε = 0.2, β = 0, GRPO advantages, 64 prompts × 8 samples,
prompt 256 / response 512 tokens, 2 minibatches) except: LoRA rank 64 on all seven projections,
like verl's LoRA GRPO examples (rank 64, alpha 32, all linear layers), with alpha 64 (a scale of 1,
so the learning rate alone sets the step); learning rate 1e-5, ten times the full fine-tuning rate
(LoRA's best learning rate is about 10× full fine-tuning's in Thinking Machines' "LoRA Without
Regret"); micro-batches of 16; weight decay 0; the base and the compute in bfloat16; the model
7B and all 512 rollout rows decoded at once (the KV cache above). `get_config` builds on
configs/gsm8k_qwen.py's and sets only these.
The export is a PEFT adapter directory (<workdir>/peft, 0.65 GB) next to a merged HF model
(<workdir>/hf, 15 GB) that `cfpo_jax.evaluate` and vLLM load.
"""

import importlib.util
import os

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def _gsm8k_qwen():
    """configs/gsm8k_qwen.py, loaded by path as config_flags loads configs (configs/ is no package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_qwen.py")
    spec = importlib.util.spec_from_file_location("gsm8k_qwen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _gsm8k_qwen().get_config("0.5b")  # everything but the model and what LoRA changes
    c.workdir = "runs/gsm8k_qwen_lora"
    c.model.path = MODEL
    c.sampling.max_concurrent = 512  # the whole rollout at once: the 21.0 GiB KV cache above

    c.lora.rank = 64
    c.lora.alpha = 64.0
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.lora.base_dtype = "bfloat16"

    c.rl.micro_batch_size = 16
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.0
    c.train.export_peft = True
    return c
