"""The one config schema: every field a run can set, its type and default, and its validation.

Configs in `configs/` start from `base_config()` and override values; they never add fields.
`validate(config)` runs once at load (train.py, evaluate.py) and fails with the valid names on an
unknown field, a wrong type, or a value outside its registry (objective, agg, estimator, ...).

Sections: seed, workdir, model, mesh, data, sampling, rewards, eval, rl, optim,
train, warmstart. Optional values are typed placeholders (`placeholder(float)` is None until set,
and then only takes a float), so `--config.rl.eps_high=0.28` works and `=abc` fails at parse time.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from cfpo_jax import advantages, losses
from cfpo_jax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

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
    c.mesh.distributed = False  # jax.distributed.initialize() (TPU pods, SLURM)

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic:arithmetic"
    c.data.preset = OPTIONAL(str)  # "gsm8k" | "math" | "math500"
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

    c.rewards = ml_collections.ConfigDict()
    c.rewards.fns = ("math",)  # registered names or "package.module:function"
    c.rewards.weights = (1.0,)
    # 0: score in the main thread under a SIGALRM deadline. That cannot interrupt one long C call
    # (sympy expanding 9^9^9^9 inside math-verify); only a worker pool (>= 1, whose stuck workers
    # are killed) can, so configs scoring model output with `math` use workers.
    c.rewards.num_workers = 0
    c.rewards.timeout_s = 5.0
    # Reward models ("rm:<path>" in fns, issue 14): scored on device with their own chat template.
    c.rewards.rm_max_len = 2048  # tokens of templated prompt + completion; longer keeps the end
    c.rewards.rm_batch_size = 0  # sequences per reward-model forward; 0 = the whole rollout
    c.rewards.rm_dtype = ""  # params and compute, e.g. "bfloat16"; "" = the checkpoint's

    c.eval = ml_collections.ConfigDict()
    c.eval.sources = ()  # data specs, e.g. ("tfds:math500", "hf:openai/gsm8k:test")
    c.eval.num_samples = 1
    c.eval.ks = (1,)
    c.eval.greedy = True
    c.eval.every_steps = 0  # 0: only at the end of training (when sources are set)
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
    c.rl.eps_high = OPTIONAL(float)  # clip-higher; None = eps
    c.rl.dual_clip = OPTIONAL(float)  # ppo only, > 1
    c.rl.level = "token"  # "token" | "sequence" (GSPO-style ratio)
    c.rl.agg = "token-mean"
    c.rl.estimator = "grpo"
    c.rl.group_size = 8
    c.rl.num_epochs = 1  # the paper's "iterations" μ: passes over one rollout batch
    c.rl.num_minibatches = 1  # the paper's "batch ratio": updates per pass
    c.rl.micro_batch_size = 0  # sequences per gradient-accumulation micro-batch; 0 = minibatch
    c.rl.beta = 0.0  # KL-to-reference coefficient; 0 loads no reference model
    c.rl.kl_estimator = "k3"

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
    c.train.tensorboard = True
    c.train.wandb_project = ""  # "" disables Weights & Biases

    # Supervised warm start on gold answers before RL (the quickstart's tiny model starts random).
    c.warmstart = ml_collections.ConfigDict()
    c.warmstart.steps = 0
    c.warmstart.lr = 1e-3
    c.warmstart.batch_size = 32
    return c


# Value registries checked at load, in addition to the schema's names and types.
_CHOICES = {
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat_policy": REMAT_POLICIES,
    "model.attention": ATTENTION_IMPLEMENTATIONS,
    "rewards.rm_dtype": ("", "float32", "bfloat16"),
    "data.template": ("chat", "plain"),
    "data.preset": (None, "gsm8k", "math", "math500"),
    "rl.objective": tuple(losses.REGISTRY["objective"]),
    "rl.level": tuple(losses.REGISTRY["level"]),
    "rl.agg": tuple(losses.REGISTRY["agg"]),
    "rl.kl_estimator": tuple(losses.REGISTRY["kl"]),
    "rl.estimator": tuple(advantages.ESTIMATORS),
    "optim.schedule": ("constant", "cosine", "linear"),
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
    rl = config.rl
    if rl.eps <= 0 or (rl.eps_high is not None and rl.eps_high <= 0):
        errors.append(f"rl.eps and rl.eps_high must be > 0; got {rl.eps}, {rl.eps_high}")
    if rl.dual_clip is not None and (rl.objective != "ppo" or rl.dual_clip <= 1):
        errors.append(f"rl.dual_clip={rl.dual_clip} needs rl.objective='ppo' and a value > 1")
    for name in ("group_size", "num_epochs", "num_minibatches"):
        if rl[name] < 1:
            errors.append(f"rl.{name} must be >= 1; got {rl[name]}")
    if rl.beta < 0:
        errors.append(f"rl.beta must be >= 0; got {rl.beta}")
    rollout = config.data.batch_size * rl.group_size
    if rollout % rl.num_minibatches:
        errors.append(
            f"rl.num_minibatches={rl.num_minibatches} must divide data.batch_size × rl.group_size"
            f" = {rollout}"
        )
    minibatch = rollout // max(rl.num_minibatches, 1)
    if rl.micro_batch_size and minibatch % rl.micro_batch_size:
        errors.append(
            f"rl.micro_batch_size={rl.micro_batch_size} must divide the minibatch of {minibatch}"
        )
    if len(config.rewards.fns) != len(config.rewards.weights) or not config.rewards.fns:
        errors.append(
            f"rewards.fns {config.rewards.fns} and rewards.weights {config.rewards.weights} "
            "must be non-empty and of the same length"
        )
    if not config.model.path:
        errors.append("model.path is empty; give a HF directory, a hub id, or 'tiny'")
    for name in ("num_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
        if config.train[name] < 1:
            errors.append(f"train.{name} must be >= 1; got {config.train[name]}")
    if config.sampling.temperature <= 0:
        errors.append(
            f"sampling.temperature must be > 0 for RL (the ratio needs the sampling "
            f"distribution); got {config.sampling.temperature}"
        )
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))
