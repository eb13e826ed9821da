"""Per-device memory of the real configs' learner, from XLA's compiled program, without the hardware.

    python benchmarks/memory.py                                   # every Qwen config (~15 min, 2 cores)
    python benchmarks/memory.py --configs configs/math_qwen.py:7b
    python benchmarks/memory.py --configs configs/math_qwen.py:7b --set rl.micro_batch_size=8

For each config: the trainer's own jitted functions (`cfpo_jax.train`: the update — micro-batched
forward/backward with exact accumulation, then AdamW — and the old-logprob pass) at the config's
minibatch, micro-batch, lengths, dtypes, remat and mesh, with the model's shape (Qwen2.5, from
benchmarks/shapes.py) and fake CPU devices standing in for the accelerators the config's docstring
names (8 for math_qwen, 1 for gsm8k_qwen). Nothing is
materialised: the state and the batch are `jax.ShapeDtypeStruct`s carrying the shardings the
trainer gives them, the functions are AOT-lowered and compiled for that mesh, and
`compiled.memory_analysis()` gives the bytes one device holds:

* arguments (params fp32, Adam moments, rng/counters, this device's rows of the minibatch),
  outputs, aliased (the donated state, reused in place), temporaries (activations, gradients,
  the gathered layer weights, XLA's scratch);
* peak = arguments + outputs − aliased + temporaries: everything XLA needs live at once for the
  step, which must fit the accelerator's memory (80 GB on an H100/A100-80GB).

What this does not see: the sampler (its KV cache and the bf16 copy of the weights, which exist
only during rollout), the framework's own reserve, and the difference between the CPU and GPU
compilers. In particular attention compiles to the einsum path here (CPU), which materialises
float32 [T, T] scores per layer of the micro-batch being recomputed; cuDNN/splash on the real
hardware never do, so the temporaries are an upper bound for that part.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

# 8 fake CPU devices; must be set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# Run as a script from a checkout: the package is the directory above this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

import shapes  # noqa: E402
from cfpo_jax import config as config_lib  # noqa: E402
from cfpo_jax import data, models, sharding, train  # noqa: E402

# Each config on the machine its docstring names: gsm8k_qwen one GPU, math_qwen 8 GPUs.
CONFIGS = {"configs/gsm8k_qwen.py:0.5b": 1, "configs/gsm8k_qwen.py:1.5b": 1, "configs/math_qwen.py:1.5b": 8,
           "configs/math_qwen.py:3b": 8, "configs/math_qwen.py:7b": 8}
GB = 1e9


def load_config(spec: str, overrides=()):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for override in overrides:
        key, _, value = override.partition("=")
        section, field = key.split(".")
        config[section][field] = type(config[section][field])(value)
    config_lib.validate(config)
    return config


def abstract_learner(config, mesh):
    """(update, logprobs, abstract state, abstract minibatch, abstract rollout columns): the
    trainer's jitted functions and ShapeDtypeStruct inputs with the trainer's shardings."""
    rl, sampling_config = config.rl, config.sampling
    model_config = shapes.model_config(
        shapes.shape_of_hub_id(config.model.path), param_dtype=config.model.param_dtype,
        dtype=config.model.dtype, remat=config.model.remat, remat_policy=config.model.remat_policy,
        attention=config.model.attention)
    abstract_model = nnx.eval_shape(lambda: models.Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(abstract_model, nnx.Param, ...)
    param_sh = sharding.param_shardings(mesh, params)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, param_sh)
    updates_per_step = rl.num_epochs * rl.num_minibatches
    tx, schedule = train.make_optimizer(config.optim, config.train.num_steps * updates_per_step)
    _, state = train.create_state(params, tx, mesh, seed=config.seed, beta=rl.beta)
    state_sh = jax.tree.map(lambda x: x.sharding, state)

    batch_sh = sharding.batch_sharding(mesh)
    rows = config.data.batch_size * rl.group_size // rl.num_minibatches
    N = sampling_config.max_new_tokens
    L = data.bucket_width(sampling_config.max_prompt_len) + N
    column = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
    minibatch = dict(tokens=column((rows, L), jnp.int32), attn=column((rows, L), jnp.int32),
                     mask=column((rows, N), jnp.float32), adv=column((rows,), jnp.float32),
                     old_logp=column((rows, N), jnp.float32))
    if rl.beta > 0:
        minibatch["ref_logp"] = column((rows, N), jnp.float32)
    pure_update = train.make_update(graphdef, tx, schedule, rl,
                                    temperature=sampling_config.temperature,
                                    max_len=N, micro_batch_size=rl.micro_batch_size)
    # `frozen` (the non-trained model state) is empty without LoRA: closing over it costs nothing.
    update = jax.jit(
        lambda state, batch: pure_update(state, frozen, batch),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, NamedSharding(mesh, PS())),
        donate_argnums=0)
    rollout = rows * rl.num_minibatches
    logprobs = jax.jit(
        train.make_logprobs(graphdef, frozen, temperature=sampling_config.temperature,
                            micro_batch_size=rl.micro_batch_size, num_new=N),
        in_shardings=(param_sh, batch_sh, batch_sh), out_shardings=(batch_sh, batch_sh))
    columns = (column((rollout, L), jnp.int32), column((rollout, L), jnp.int32))
    return update, logprobs, state, minibatch, params, columns


def analyse(jitted, *args):
    start = time.time()
    memory = jitted.lower(*args).compile().memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return dict(args=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
                alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes, peak=peak,
                compile_s=time.time() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="config files with their argument")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices of the mesh (default: 1 for gsm8k_qwen, 8 for math_qwen)")
    parser.add_argument("--set", nargs="*", default=(), metavar="SECTION.FIELD=VALUE",
                        help="config overrides (e.g. rl.micro_batch_size=8 model.remat_policy=full)")
    parser.add_argument("--device-gb", type=float, default=80.0, help="memory of one accelerator")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} fake {jax.default_backend()} devices; "
          f"per-device GB (1e9 bytes); fits = peak <= {args.device_gb:g} GB")
    header = ("config", "mesh", "rows/micro", "L", "remat", "fn", "args", "out", "alias", "temp",
              "peak", "fits", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    for spec in args.configs:
        config = load_config(spec, args.set)
        devices = jax.devices()[:args.devices or CONFIGS.get(spec, 8)]
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
        update, logprobs, state, minibatch, params, columns = abstract_learner(config, mesh)
        rl = config.rl
        remat = config.model.remat_policy if config.model.remat else "off"
        mesh_text = "×".join(f"{k}{v}" for k, v in mesh.shape.items() if v > 1) or "1"
        for name, result in (("update", analyse(update, state, minibatch)),
                             ("logprobs", analyse(logprobs, params, *columns))):
            rows = minibatch["tokens"].shape[0] if name == "update" else columns[0].shape[0]
            cells = (spec.removeprefix("configs/"), mesh_text, f"{rows}/{rl.micro_batch_size or rows}",
                     str(columns[0].shape[1]), remat, name,
                     *(f"{result[k] / GB:.2f}" for k in ("args", "out", "alias", "temp", "peak")),
                     "yes" if result["peak"] <= args.device_gb * GB else "**no**",
                     f"{result['compile_s']:.0f}")
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
