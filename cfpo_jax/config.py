"""The one config schema: every field a run can set, its type and default, and its validation.

Configs in `configs/` start from `base_config()` and override values; they never add fields.
`validate(config)` runs once at load (train.py, evaluate.py), before any model is built or
compiled, and fails with the valid names on an unknown field, a wrong type, a value outside its
registry (objective, agg, estimator, ...: the valid choices are read from the registries that
define them), a malformed or missing data source, a reward function that does not resolve (user
"package.module:function" imported here), or eval.ks outside 1..eval.num_samples. Each section
has its own check (`_SECTION_CHECKS`).

Config files are found by name (`find`): `math_qwen.py:1.5b` is the shipped configs/math_qwen.py
with the argument "1.5b", wherever the command runs and also after a non-editable install (the
wheel carries configs/ inside the package); a path that exists is used as it is.

Sections: seed, workdir, model, mesh, data, sampling, rewards, eval, rl, optim,
train, warmstart, lora, env. Optional values are typed placeholders (`placeholder(float)` is None until
set, and then only takes a float), so `--config.rl.eps_high=0.28` works and `=abc` fails at parse time.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import os
import sys

from cfpo_jax import advantages, data, losses, moe_config, rewards, state
from cfpo_jax.envs import formats
from cfpo_jax.models.attention import DECODE_IMPLEMENTATIONS
from cfpo_jax.models.config import ATTENTION_IMPLEMENTATIONS, LORA_TARGETS, REMAT_POLICIES
from cfpo_jax.models.matmul import IMPLEMENTATIONS as MATMUL_IMPLEMENTATIONS
from cfpo_jax.rewards import workers as reward_workers

OPTIONAL = config_dict.placeholder


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default. Defaults are the paper's CFPO setting where it has one."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = ""  # where checkpoints, metrics, TensorBoard and exports go; --workdir overrides

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF directory or hub id; "tiny" builds `model.tiny` locally (quickstart)
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"  # compute dtype
    c.model.remat = False  # rematerialise each layer in the backward pass (less memory)
    # What a rematted layer keeps: "full" (only its input; least memory, reruns the layer
    # forward), "dots_with_no_batch_dims" (also the weight-matmul outputs; little recompute, the
    # usual choice when it fits), "dots" (also [T, T] scores on the einsum path; for comparison).
    c.model.remat_policy = "full"
    # Full-sequence attention kernel: "auto" = cuDNN flash on GPU (bf16), Pallas splash on TPU,
    # einsum on CPU; see cfpo_jax/models/attention.py.
    c.model.attention = "auto"
    # Unroll the layer scan: faster for shallow models on CPU (benchmarks/README.md), compile time
    # grows with depth. Keep False for real models.
    c.model.unroll_layers = False
    # Only read when path == "tiny": a random-init decoder with a character-level tokenizer,
    # written to <workdir>/tiny_model in Hugging Face format so the normal loader is used.
    c.model.tiny = ml_collections.ConfigDict()
    c.model.tiny.hidden_size = 64
    c.model.tiny.intermediate_size = 192
    c.model.tiny.num_layers = 2
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1
    # Slices joined by the data-centre network (multi-slice TPU): `data` spans them, the sizes above
    # are per slice (cfpo_jax.sharding.make_mesh); 1 = one slice.
    c.mesh.dcn = 1
    c.mesh.distributed = False  # jax.distributed.initialize() (TPU pods, SLURM)
    # Multi-process by hand (sharding.initialize_distributed); empty: jax's cluster auto-detection.
    c.mesh.coordinator_address = ""  # "host:port" of process 0
    c.mesh.num_processes = 0
    c.mesh.process_id = -1
    # Rollout / learner placement (issue 32; sharding.placement, cfpo_jax.weight_sync). 0: both
    # share every device (colocated). N > 0 (disaggregated): N devices sample (the rollout mesh,
    # sized by mesh.rollout), the rest learn (the mesh above); the weights reach the sampler after
    # each update device to device (metric weight_sync_s) and the rollout batch comes back the
    # same way. N must leave at least one learner device.
    c.mesh.rollout_devices = 0
    # Which N devices: "first" (the first N of the process-major device list: with several
    # processes, whole processes — one process samples, the others learn) or "per_process" (the
    # first N / P devices of each of the P processes: both meshes span every process).
    c.mesh.rollout_placement = "first"
    c.mesh.rollout = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # its mesh sizes

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic:arithmetic"
    # "gsm8k" | "math" | "math500" | "prompt_collection" | "humaneval" | "mbpp"
    c.data.preset = OPTIONAL(str)
    c.data.template = "chat"  # "chat" | "plain"
    c.data.system_prompt = ""
    c.data.user_template = "{question}"
    c.data.batch_size = 8  # prompts per RL step (each sampled rl.group_size times)
    c.data.seed = 0
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.digits = 1
    c.data.synthetic.ops = "+"
    c.data.synthetic.terms = 2

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_prompt_len = 256
    c.sampling.max_new_tokens = 256
    c.sampling.temperature = 1.0
    c.sampling.top_p = 1.0
    c.sampling.top_k = 0
    # The rollout engine (cfpo_jax.sampling): rows decoded at once, over the whole mesh; 0 = as
    # many as fit kv_cache_gb GB of keys/values per device (the K chosen is printed at the first
    # rollout). Results do not depend on it; memory does.
    c.sampling.max_concurrent = 0
    c.sampling.kv_cache_gb = 8.0
    c.sampling.attention = "auto"  # decode attention: auto (Pallas on GPU, paged on TPU, native on CPU), einsum, reduce, native, pallas, paged
    c.sampling.matmul = "auto"  # the sampler's projections: auto (native on CPU), xla, native (models/matmul.py)

    c.rewards = ml_collections.ConfigDict()
    c.rewards.fns = ("math",)  # registered names or "package.module:function"
    c.rewards.weights = (1.0,)
    # Rewards run in worker processes (>= 1), each item under timeout_s (killed at timeout_s +
    # 0.5 s) and each worker under an address-space limit of max_memory_gb (cfpo_jax.rewards.workers).
    c.rewards.num_workers = reward_workers.DEFAULT_NUM_WORKERS
    c.rewards.timeout_s = reward_workers.DEFAULT_TIMEOUT_S
    c.rewards.max_memory_gb = reward_workers.DEFAULT_MAX_MEMORY_GB
    # Reward models ("rm:<path>" in fns, issue 14): scored on device with their own chat template.
    c.rewards.rm_max_len = 2048  # tokens of templated prompt + completion; longer keeps the end
    c.rewards.rm_batch_size = 0  # sequences per reward-model forward; 0 = the whole rollout
    c.rewards.rm_dtype = ""  # params and compute, e.g. "bfloat16"; "" = the checkpoint's
    # The sandbox of the `code` reward and the python tool (issue 31): True refuses to run code
    # unless every protection of cfpo_jax.sandbox.FULL holds (sandbox.configure(strict=...));
    # False runs with what this machine allows, logged once at start (sandbox.isolation()).
    c.rewards.code_strict = False

    c.eval = ml_collections.ConfigDict()
    c.eval.sources = ()  # data specs, e.g. ("tfds:math500", "hf:openai/gsm8k:test")
    c.eval.num_samples = 1
    c.eval.ks = (1,)
    c.eval.greedy = True
    c.eval.every_steps = 0  # 0: only at the end of training (when sources are set)
    # Also evaluate the policy RL starts from (after any warm start) as step 0, as verl's
    # val_before_train: the baseline a run's evaluations are compared with.
    c.eval.at_start = False
    c.eval.max_examples = 0  # 0: all
    c.eval.checkpoint = ""  # for `python -m cfpo_jax.evaluate`: a HF directory (e.g. <workdir>/hf)
    c.eval.output_dir = ""  # default <workdir>/eval
    # lm-evaluation-harness tasks (the [eval] extra, issue 14) for `python -m cfpo_jax.evaluate`:
    # run on model.path (before) and eval.checkpoint (after); the relative change is the
    # alignment tax. e.g. ("arc_easy", "hellaswag", "winogrande").
    c.eval.lm_eval_tasks = ()
    c.eval.lm_eval_limit = 0  # examples per task; 0 = all
    c.eval.lm_eval_batch_size = 16
    c.eval.lm_eval_include_path = ""  # a directory of extra task YAMLs

    c.rl = ml_collections.ConfigDict()
    c.rl.objective = "cfpo"  # "cfpo" | "ppo" (GRPO = ppo objective + grpo estimator)
    c.rl.eps = 0.2
    # clip-higher; None = eps. Under cfpo it sets ε for A > 0 (our choice: the paper's reference
    # patches use one ε; see cfpo_jax.losses).
    c.rl.eps_high = OPTIONAL(float)
    c.rl.dual_clip = OPTIONAL(float)  # ppo only, > 1
    c.rl.level = "token"  # "token" | "sequence" (GSPO-style ratio)
    c.rl.agg = "token-mean"
    c.rl.estimator = "grpo"
    c.rl.group_size = 8
    c.rl.num_epochs = 1  # the paper's "iterations" μ: passes over one rollout batch
    c.rl.num_minibatches = 1  # the paper's "batch ratio": updates per pass
    c.rl.micro_batch_size = 0  # sequences per gradient-accumulation micro-batch; 0 = minibatch
    # Sequence packing (issue 22, cfpo_jax.packing): the update and the old-logprob / reference
    # passes run on packed rows (several prompt + completion sequences end to end per row of the
    # unpacked width, segment ids, RoPE restarting per sequence) instead of prompt bucket +
    # max_new_tokens columns per sequence: compute, activations and attention on real tokens
    # only; losses and metrics equal the unpacked ones (to float rounding). Costs: a host plan
    # per minibatch (milliseconds), a few compiled shapes (bucketed row counts, the
    # `learner_shapes` metric) instead of one, and index gathers on device. A minibatch that
    # packing would not shrink (sequences near full length) runs unpacked; `packed_rows_frac`
    # logs the rows run over the unpacked rows per step. With rl.micro_batch_size a micro-batch
    # is that many packed rows. False: the unpacked path always (kept for comparison and
    # tests). Measured in benchmarks/packing.py.
    c.rl.pack = True
    c.rl.beta = 0.0  # KL-to-reference coefficient; 0 loads no reference model
    c.rl.kl_estimator = "k3"
    # True: β·Σ_t KL_t is subtracted from each response's reward before advantages (RLOO in
    # OpenRLHF/verl, the paper's alignment runs), and there is no KL loss term. False: the KL is a
    # loss term aggregated with rl.agg (issue 14).
    c.rl.kl_in_reward = False
    # Asynchronous RL at a fixed lag (issue 32; cfpo_jax.async_rollout, rollout.Lagged): k >= 1
    # generates the rollout of step t with the policy of step max(t - k, 0) in a producer thread
    # while the learner runs, whatever the timing (runs reproduce); the k queued rollouts are
    # saved with each checkpoint. 0: the synchronous loop. Several processes (mesh.distributed):
    # no thread, the same fixed-lag schedule issued in one order on every process (no overlap yet).
    c.rl.max_staleness = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 0  # in optimiser updates (num_epochs × num_minibatches per RL step)
    c.optim.schedule = "constant"  # after warmup: "constant" | "cosine" | "linear" (to 0)
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.max_grad_norm = 1.0  # global-norm clipping; 0 disables

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100  # RL steps
    c.train.log_every = 1  # console lines; metrics.jsonl gets every step regardless
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.export_hf = False  # write the final policy to <workdir>/hf as a HF directory
    c.train.export_peft = False  # with lora.rank > 0: the adapters to <workdir>/peft (PEFT LoRA)
    c.train.tensorboard = True
    c.train.wandb_project = ""  # "" disables Weights & Biases

    # Supervised warm start on gold answers before RL (the quickstart's tiny model starts random).
    c.warmstart = ml_collections.ConfigDict()
    c.warmstart.steps = 0
    c.warmstart.lr = 1e-3
    c.warmstart.batch_size = 32
    # The target, a format string over the example's fields. A target that ends at a stop string
    # of env.format (a tool call, e.g. "<tool>print({expression})</tool>") ends the turn there,
    # as in sampling; any other is followed by EOS.
    c.warmstart.target = "{answer}"

    # LoRA (cfpo_jax.lora): rank > 0 trains low-rank adapters only, on a frozen base whose
    # weights are `base_dtype`; the reference policy (β > 0) is then the base, adapters off.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0: no adapters, the whole model trains
    c.lora.alpha = 16.0  # adapters add (alpha / rank)·x·A·B
    c.lora.targets = LORA_TARGETS
    c.lora.dropout = 0.0  # only 0 is supported (see cfpo_jax.lora)
    c.lora.base_dtype = OPTIONAL(str)  # the frozen weights' dtype; None: model.param_dtype
    # Sample from merged kernels (one merge per rollout, one more copy of the adapted kernels)
    # instead of applying the adapters on the fly in every decode step.
    c.lora.merge_for_sampling = False

    # Multi-turn episodes with tools (cfpo_jax.envs, issue 23). name "" keeps single-turn
    # sampling exactly; otherwise each prompt starts an episode whose token budget (model and
    # tool tokens together) is sampling.max_new_tokens, and only the model's tokens are trained.
    c.env = ml_collections.ConfigDict()
    c.env.name = ""  # "" | "tools" (run the turn's tool calls) | "package.module:function"
    c.env.format = "tag"  # tool-call format: "tag" (<tool>…</tool>), "hermes" (Qwen2.5), "llama3"
    c.env.tools = ()  # "calculator", "python" (sandboxed) or "package.module:function"
    c.env.max_turns = 4  # model turns per episode
    c.env.tool_timeout_s = 10.0  # per tool call; the answer is then a time-out error
    c.env.max_observation_chars = 2000  # a tool result is cut to this many characters
    c.env.num_threads = 8  # tool calls and environment steps run in this many threads

    # The RLVR recipe set (issue 34: DAPO, entropy control) and off-policy corrections (issue 32,
    # point 3). Every default keeps the plain loop; checked by `_rlvr_errors`.
    # Entropy control ("The Entropy Mechanism of RL for Reasoning LMs"; cfpo_jax.losses): "none" |
    # "clip_cov" (stop the gradient of clip_cov_ratio of the tokens, drawn among those with
    # clip_cov_lb < cov(logp, A) < clip_cov_ub) | "kl_cov" (kl_cov_coef·|logp − old_logp| on the
    # kl_cov_ratio of the tokens of largest covariance). The paper's values as defaults.
    c.rl.entropy_control = "none"
    c.rl.clip_cov_ratio = 2e-4
    c.rl.clip_cov_lb = 1.0
    c.rl.clip_cov_ub = 5.0
    c.rl.kl_cov_ratio = 2e-3
    c.rl.kl_cov_coef = 1.0
    # The ratio's reference: "recomputed" (old logprobs from the learner at the start of the step,
    # AReaL's proximal policy) | "behaviour" (the sampler's own logprobs; off policy the learner
    # still recomputes old logprobs, for the entropy and sampler-gap metrics).
    c.rl.ratio_reference = "recomputed"
    # Sampler/learner mismatch: "none" | "tis" (each token's objective × min(π_old/π_sampler, C))
    # | "mask" (tokens whose weight leaves [1/C, C] contribute 0); C = rollout_correction_cap.
    c.rl.rollout_correction = "none"
    c.rl.rollout_correction_cap = 2.0
    # DAPO's overlong filter: responses truncated at sampling.max_new_tokens leave the loss (their
    # rewards still count in their group's advantages).
    c.rl.overlong_filter = False
    # DAPO's dynamic sampling (cfpo_jax.dynamic_sampling): groups whose rewards are all equal are
    # dropped and more rounds of data.batch_size prompts are sampled until data.batch_size
    # informative groups, at most dynamic_sampling_max_rounds rounds (then the batch is filled up
    # with uninformative groups, and the metrics say so).
    c.rl.dynamic_sampling = False
    c.rl.dynamic_sampling_max_rounds = 3
    # DAPO's soft overlong punishment (cfpo_jax.rewards.overlong): −overlong_penalty ×
    # (length − (max_new_tokens − overlong_buffer)) / overlong_buffer added to the reward over the
    # last overlong_buffer tokens of the budget; 0 turns it off.
    c.rewards.overlong_buffer = 0
    c.rewards.overlong_penalty = 1.0

    # Mixture-of-experts policies (issue 33; cfpo_jax/models/moe.py; checked by
    # cfpo_jax.moe_config.errors). Ignored by dense models except mesh.expert.
    # "recompute": every learner pass routes tokens itself; "replay": the old-logprob, reference and
    # update passes run the experts the sampler chose for each token (recorded while decoding).
    c.model.moe_routing = "recompute"
    c.model.moe_matmul = "ragged_dot"  # experts' grouped matmul: "ragged_dot" | "megablox" (TPU)
    c.model.tiny.num_experts = 0  # > 0: the tiny model is a Qwen3-MoE with this many experts
    c.model.tiny.num_experts_per_tok = 2
    c.model.tiny.moe_intermediate_size = 64
    c.mesh.expert = 1  # expert parallelism: experts (and the batch) split over this many devices
    c.rl.moe_aux_loss_coef = 0.0  # × the router load-balancing loss (transformers' definition)
    return c



# Float16 loads (models.config.SUPPORTED_DTYPES) but trains without loss scaling: not offered.
TRAINING_DTYPES = ("float32", "bfloat16")

# Value registries checked at load, in addition to the schema's names and types; each choice list
# is the registry that defines the values.
_CHOICES = {
    "model.param_dtype": TRAINING_DTYPES,
    "model.dtype": TRAINING_DTYPES,
    "model.remat_policy": REMAT_POLICIES,
    "model.attention": ATTENTION_IMPLEMENTATIONS,
    "rewards.rm_dtype": ("", *TRAINING_DTYPES),
    "data.template": data.TEMPLATES,
    "data.preset": tuple(data.PRESETS),
    "rl.objective": tuple(losses.REGISTRY["objective"]),
    "rl.level": tuple(losses.REGISTRY["level"]),
    "rl.agg": tuple(losses.REGISTRY["agg"]),
    "rl.kl_estimator": tuple(losses.REGISTRY["kl"]),
    "rl.estimator": tuple(advantages.ESTIMATORS),
    "rl.entropy_control": tuple(losses.REGISTRY["entropy_control"]),
    "rl.ratio_reference": tuple(losses.REGISTRY["ratio_reference"]),
    "rl.rollout_correction": tuple(losses.REGISTRY["rollout_correction"]),
    "optim.schedule": tuple(state.SCHEDULES),
    "sampling.attention": DECODE_IMPLEMENTATIONS,
    "sampling.matmul": MATMUL_IMPLEMENTATIONS,
    "lora.base_dtype": (None, *TRAINING_DTYPES),
    "env.format": formats.FORMATS,
}


def _walk(schema, config, prefix, errors):
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            errors.append(f"unknown field {name!r}; valid fields here: {sorted(schema.keys())}")
            continue
        want, got = schema[key], config[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(got, ml_collections.ConfigDict):
                errors.append(f"{name} must be a section with fields {sorted(want.keys())}")
            else:
                _walk(want, got, name + ".", errors)
            continue
        expected = schema.get_type(key)
        if got is None:
            if want is not None:  # only placeholders (None by default) may be None
                errors.append(f"{name} must be a {expected.__name__}; got None")
            continue
        if expected is float and isinstance(got, int) and not isinstance(got, bool):
            continue
        if not isinstance(got, expected):
            errors.append(f"{name} must be a {expected.__name__}; got {got!r}")
    for key in schema.keys():
        if key not in config:
            errors.append(f"missing field {prefix}{key}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError listing every problem: unknown/missing fields, wrong types, bad values."""
    errors: list[str] = []
    _walk(base_config(), config, "", errors)
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))
    for path, valid in _CHOICES.items():
        section, key = path.split(".")
        value = config[section][key]
        if value not in valid:
            errors.append(f"{path}={value!r}; valid: {list(valid)}")
    for check in _SECTION_CHECKS:
        errors.extend(check(config))
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def _at_least(section, names, minimum: int, prefix: str) -> list[str]:
    return [f"{prefix}.{name} must be >= {minimum}; got {section[name]}"
            for name in names if section[name] < minimum]


def _model_errors(config) -> list[str]:
    if not config.model.path:
        return ["model.path is empty; give a HF directory, a hub id, or 'tiny'"]
    return []


def _mesh_errors(config) -> list[str]:
    mesh, errors = config.mesh, []
    for axis in ("data", "fsdp", "tensor"):
        if mesh[axis] < 1 and mesh[axis] != -1:
            errors.append(f"mesh.{axis} must be >= 1 or -1 (all remaining devices); got {mesh[axis]}")
    if mesh.rollout_devices < 0:
        errors.append(f"mesh.rollout_devices={mesh.rollout_devices}: must be 0 (colocated) or the "
                      f"number of devices that sample (1 to the device count - 1)")
    if mesh.rollout_placement not in ("first", "per_process"):
        errors.append(f"mesh.rollout_placement={mesh.rollout_placement!r}: must be 'first' (the "
                      f"first N devices) or 'per_process' (N / P devices of each process)")
    elif mesh.rollout_devices and mesh.distributed and mesh.rollout_placement == "first":
        # One process samples and holds none of the learner's state; what samples in rounds or
        # episodes, or reads the learner's parameters on every process, is not wired there.
        unsupported = [name for name, on in [
            ("env.name", bool(config.env.name)), ("rl.dynamic_sampling", config.rl.dynamic_sampling),
            ("eval.sources", bool(config.eval.sources)), ("warmstart.steps", config.warmstart.steps),
            ("train.export_hf", config.train.export_hf),
            ("train.export_peft", config.train.export_peft),
            ("a reward model in rewards.fns", any(
                str(f).startswith(rewards.registry.REWARD_MODEL_PREFIX)
                for f in config.rewards.fns))] if on]
        if unsupported:
            errors.append(f"mesh.rollout_devices={mesh.rollout_devices} with mesh.distributed=True "
                          f"and mesh.rollout_placement='first' (the sampler on processes of its "
                          f"own) does not support {', '.join(unsupported)}: turn them off, or use "
                          f"mesh.rollout_placement='per_process' or mesh.rollout_devices=0")
    for axis in ("data", "fsdp", "tensor"):
        if mesh.rollout[axis] < 1 and mesh.rollout[axis] != -1:
            errors.append(f"mesh.rollout.{axis} must be >= 1 or -1 (all remaining rollout "
                          f"devices); got {mesh.rollout[axis]}")
    if mesh.dcn < 1:
        errors.append(f"mesh.dcn (slices) must be >= 1; got {mesh.dcn}")
    manual = (mesh.coordinator_address, mesh.num_processes, mesh.process_id)
    if manual != ("", 0, -1):
        if not mesh.distributed:
            errors.append("mesh.coordinator_address / num_processes / process_id need "
                          "mesh.distributed=True")
        if not mesh.coordinator_address or mesh.num_processes < 1 or \
                not 0 <= mesh.process_id < max(mesh.num_processes, 1):
            errors.append(f"by hand, give all of mesh.coordinator_address (host:port), "
                          f"num_processes >= 1 and 0 <= process_id < num_processes; got "
                          f"{mesh.coordinator_address!r}, {mesh.num_processes}, {mesh.process_id}")
    return errors


def _data_errors(config) -> list[str]:
    errors = _at_least(config.data, ("batch_size",), 1, "data")
    # Data and evaluation sources: checked here too, before any model is built or compiled.
    for name, source in [("data.source", config.data.source)] + [
            ("eval.sources", s) for s in config.eval.sources]:
        try:
            data.check_source(source, synthetic=config.data.synthetic.to_dict())
        except ValueError as e:
            errors.append(f"{name}: {e}")
    if "{question}" not in config.data.user_template:
        errors.append(f"data.user_template must contain '{{question}}'; got "
                      f"{config.data.user_template!r}")
    return errors


def _sampling_errors(config) -> list[str]:
    sampling, errors = config.sampling, []
    if sampling.max_prompt_len < 1 or sampling.max_new_tokens < 1:
        errors.append(f"sampling.max_prompt_len and max_new_tokens must be >= 1; got "
                      f"{sampling.max_prompt_len}, {sampling.max_new_tokens}")
    if not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
        errors.append(f"sampling.top_p must be in (0, 1] and top_k >= 0; got {sampling.top_p}, "
                      f"{sampling.top_k}")
    if sampling.temperature <= 0:
        errors.append(f"sampling.temperature must be > 0 for RL (the ratio needs the sampling "
                      f"distribution); got {sampling.temperature}")
    if sampling.max_concurrent < 0 or sampling.kv_cache_gb <= 0:
        errors.append(f"sampling.max_concurrent must be >= 0 (0 = from the budget) and "
                      f"sampling.kv_cache_gb > 0; got {sampling.max_concurrent}, {sampling.kv_cache_gb}")
    return errors


def _rewards_errors(config) -> list[str]:
    cfg, errors = config.rewards, []
    if len(cfg.fns) != len(cfg.weights) or not cfg.fns:
        errors.append(f"rewards.fns {cfg.fns} and rewards.weights {cfg.weights} must be non-empty "
                      "and of the same length")
    if cfg.num_workers < 1:
        errors.append(f"rewards.num_workers must be >= 1 (rewards are scored in bounded worker "
                      f"processes only); got {cfg.num_workers}")
    if not cfg.timeout_s > 0 or not cfg.max_memory_gb > 0:
        errors.append(f"rewards.timeout_s and rewards.max_memory_gb must be > 0; got "
                      f"{cfg.timeout_s}, {cfg.max_memory_gb}")
    for fn in cfg.fns:
        if fn.startswith(rewards.registry.REWARD_MODEL_PREFIX):
            if fn == rewards.registry.REWARD_MODEL_PREFIX:
                errors.append("rewards.fns: 'rm:' needs a reward model path or hub id")
            continue
        try:
            rewards.registry.implementation(fn)  # imports "package.module:function" now, not mid-run
        except ValueError as e:
            errors.append(f"rewards.fns: {e}")
    budget = config.sampling.max_new_tokens
    if not 0 <= cfg.overlong_buffer <= budget:
        errors.append(f"rewards.overlong_buffer must be in [0, sampling.max_new_tokens={budget}]; "
                      f"got {cfg.overlong_buffer}")
    if cfg.overlong_penalty < 0:
        errors.append(f"rewards.overlong_penalty must be >= 0; got {cfg.overlong_penalty}")
    return errors


def _eval_errors(config) -> list[str]:
    ev, errors = config.eval, []
    if ev.num_samples < 1 or not ev.ks or any(not 1 <= k <= ev.num_samples for k in ev.ks):
        errors.append(f"eval.ks {tuple(ev.ks)}: each k must be in 1..eval.num_samples="
                      f"{ev.num_samples} (and num_samples >= 1)")
    return errors + _at_least(ev, ("every_steps", "max_examples"), 0, "eval")


def _rl_errors(config) -> list[str]:
    rl, errors = config.rl, []
    if rl.eps <= 0 or (rl.eps_high is not None and rl.eps_high <= 0):
        errors.append(f"rl.eps and rl.eps_high must be > 0; got {rl.eps}, {rl.eps_high}")
    if rl.dual_clip is not None and (rl.objective != "ppo" or rl.dual_clip <= 1):
        errors.append(f"rl.dual_clip={rl.dual_clip} needs rl.objective='ppo' and a value > 1")
    errors += _at_least(rl, ("group_size", "num_epochs", "num_minibatches"), 1, "rl")
    if rl.beta < 0:
        errors.append(f"rl.beta must be >= 0; got {rl.beta}")
    if rl.kl_in_reward and rl.beta == 0:
        errors.append("rl.kl_in_reward=True subtracts β·KL from rewards; it needs rl.beta > 0")
    rollout = config.data.batch_size * rl.group_size
    if rollout % rl.num_minibatches:
        errors.append(f"rl.num_minibatches={rl.num_minibatches} must divide data.batch_size × "
                      f"rl.group_size = {rollout}")
    minibatch = rollout // max(rl.num_minibatches, 1)
    if rl.micro_batch_size and minibatch % rl.micro_batch_size:
        errors.append(f"rl.micro_batch_size={rl.micro_batch_size} must divide the minibatch of "
                      f"{minibatch}")
    if not isinstance(rl.max_staleness, int) or rl.max_staleness < 0:
        errors.append(f"rl.max_staleness must be an integer >= 0 (0: synchronous); got "
                      f"{rl.max_staleness!r}")
    return errors + _rlvr_errors(rl)


def _rlvr_errors(rl) -> list[str]:
    """The RLVR recipe's fields (entropy control, off-policy corrections, dynamic sampling)."""
    errors = []
    for key in ("clip_cov_ratio", "kl_cov_ratio"):
        if not 0 < rl[key] <= 1:
            errors.append(f"rl.{key} is a fraction of the tokens, in (0, 1]; got {rl[key]}")
    if rl.clip_cov_lb >= rl.clip_cov_ub:
        errors.append(f"rl.clip_cov_lb={rl.clip_cov_lb} must be below rl.clip_cov_ub="
                      f"{rl.clip_cov_ub}")
    if rl.kl_cov_coef < 0:
        errors.append(f"rl.kl_cov_coef must be >= 0; got {rl.kl_cov_coef}")
    per_token = [f"rl.{key}={rl[key]!r}" for key in ("entropy_control", "rollout_correction")
                 if rl[key] != "none"]
    if per_token and rl.level != "token":
        errors.append(f"{' and '.join(per_token)} act per token; they need rl.level='token' "
                      f"(got {rl.level!r})")
    if rl.rollout_correction != "none" and rl.ratio_reference != "recomputed":
        errors.append(f"rl.rollout_correction={rl.rollout_correction!r} weighs π_old/π_sampler; "
                      "it needs rl.ratio_reference='recomputed'")
    if rl.rollout_correction_cap <= 1:
        errors.append(f"rl.rollout_correction_cap must be > 1; got {rl.rollout_correction_cap}")
    errors += _at_least(rl, ("dynamic_sampling_max_rounds",), 1, "rl")
    if rl.dynamic_sampling and rl.group_size < 2:
        errors.append("rl.dynamic_sampling keeps groups whose rewards differ; it needs "
                      f"rl.group_size >= 2 (got {rl.group_size})")
    return errors


def _optim_errors(config) -> list[str]:
    optim = config.optim
    if optim.lr < 0 or optim.warmup_steps < 0 or optim.weight_decay < 0 or \
            optim.max_grad_norm < 0 or not (0 <= optim.b1 < 1 and 0 <= optim.b2 < 1):
        return [f"optim: need lr, warmup_steps, weight_decay, max_grad_norm >= 0 and b1, b2 "
                f"in [0, 1); got {optim.lr}, {optim.warmup_steps}, {optim.weight_decay}, "
                f"{optim.max_grad_norm}, {optim.b1}, {optim.b2}"]
    return []


def _train_errors(config) -> list[str]:
    return _at_least(config.train, ("num_steps", "checkpoint_every", "keep_checkpoints",
                                    "log_every"), 1, "train")


def _warmstart_errors(config) -> list[str]:
    return (_at_least(config.warmstart, ("steps",), 0, "warmstart")
            + _at_least(config.warmstart, ("batch_size",), 1, "warmstart"))


def _lora_errors(config) -> list[str]:
    lora, errors = config.lora, []
    if lora.rank < 0:
        errors.append(f"lora.rank must be >= 0 (0: no adapters); got {lora.rank}")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown or not lora.targets:
        errors.append(f"lora.targets={lora.targets}: need a non-empty subset of {list(LORA_TARGETS)}")
    if lora.rank and lora.alpha <= 0:
        errors.append(f"lora.alpha must be > 0; got {lora.alpha}")
    if lora.dropout != 0:
        errors.append(f"lora.dropout={lora.dropout}: only 0 is supported (dropout would make the "
                      "trainer's log-probabilities random, so the on-policy ratio would not be 1)")
    if not lora.rank and (config.train.export_peft or lora.base_dtype is not None):
        errors.append("train.export_peft and lora.base_dtype need lora.rank > 0")
    return errors


def _env_errors(config) -> list[str]:
    env = config.env
    if not env.name:
        return []
    from cfpo_jax.envs import environment, tools  # imports a user's module now, not mid-run

    errors = []
    for kind, names, get in (("env.name", (env.name,), environment.get), ("env.tools", env.tools, tools.get)):
        for name in names:
            try:
                get(name)
            except ValueError as e:
                errors.append(f"{kind}: {e}")
    if env.name == "tools" and not env.tools:
        errors.append("env.name='tools' runs the model's tool calls; give env.tools, e.g. ('calculator',)")
    errors += _at_least(env, ("max_turns", "num_threads", "max_observation_chars"), 1, "env")
    if not env.tool_timeout_s > 0:
        errors.append(f"env.tool_timeout_s must be > 0; got {env.tool_timeout_s}")
    return errors


# One check per section, in the order of `base_config`.
_SECTION_CHECKS = (_model_errors, _mesh_errors, _data_errors, _sampling_errors, _rewards_errors,
                   _eval_errors, _rl_errors, _optim_errors, _train_errors, _warmstart_errors,
                   _lora_errors, _env_errors, moe_config.errors)


# ---------------------------------------------------------------- config files by name


def shipped_configs_dir() -> str:
    """The shipped configs/: inside the package after a wheel install, beside it in a checkout."""
    package = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(package, "configs")
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(package), "configs")


def find(spec: str) -> str:
    """The config file `spec` ("path/to/x.py[:arg]" or a shipped config's name "x.py[:arg]",
    "x[:arg]", "studies/y.py") names, with its ":arg" kept: a path that exists as given is
    used as it is; otherwise the name is looked up in the shipped configs (`configs/x.py` also
    works, for commands written for a checkout)."""
    path, colon, arg = spec.partition(":")
    if os.path.exists(path):
        return spec
    name = path[len("configs/"):] if path.startswith("configs/") else path
    name = name if name.endswith(".py") else name + ".py"
    shipped = os.path.join(shipped_configs_dir(), name)
    if not os.path.exists(shipped):
        here = shipped_configs_dir()
        names = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
        raise ValueError(f"config {path!r}: no such file, and no shipped config {name!r}; shipped "
                         f"(in {here}): {names}")
    return shipped + colon + arg


def resolve_flag(argv: list[str], flag: str, *, default: str | None = None) -> list[str]:
    """`argv` with `--<flag>=<spec>` replaced by the file `find` gives (or `default` added when
    the flag is absent); a spec that names nothing exits with the shipped names."""
    out, found = list(argv), False
    for i, arg in enumerate(out):
        # "--flag=spec", or "--flag spec" as two arguments
        value_at = i if arg.startswith(f"--{flag}=") else i + 1 if arg == f"--{flag}" else None
        if value_at is None or value_at >= len(out):
            continue
        found = True
        prefix, spec = (f"--{flag}=", arg.split("=", 1)[1]) if value_at == i else ("", out[value_at])
        try:
            out[value_at] = prefix + find(spec)
        except ValueError as e:
            sys.exit(f"error: --{flag}: {e}")
    if not found and default is not None:
        out.insert(1, f"--{flag}={find(default)}")
    return out


def valid_fields_hint(override: str) -> str:
    """For a bad `--config.a.b=v`: a line naming the valid fields of its section ("" if none)."""
    *sections, _ = override[len("--config."):].split("=")[0].split(".")
    node = base_config()
    for section in sections:
        node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict):
        return ""
    where = ".".join(sections) or "the top level"
    return f"  valid fields of {where}: {sorted(node.keys())}\n"
