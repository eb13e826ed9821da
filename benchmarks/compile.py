"""Every config's programs compiled by the real chip compilers for an H100 host or a TPU slice,
on a CPU host without the hardware.

    python benchmarks/compile.py --target v5e-8 --configs configs/gsm8k_qwen.py:0.5b
    python benchmarks/compile.py --target h100x8 --configs configs/math_qwen.py:7b --json out.json
    python benchmarks/compile.py --target v5p-8            # its recorded configs (CONFIGS; minutes per 7B program)
    python benchmarks/compile.py --target v5p-64x2 --configs configs/math_qwen.py:32b --programs update
    python benchmarks/compile.py --target v5p-16 --configs configs/math_qwen.py:7b --side rollout

Targets (`cfpo_jax.aot.targets`): h100x1, h100x8, v5p-8, v5e-8, v6e-8, v4-8 (one host; Cloud's
names: v5p-8 and v4-8 are 4 chips, v5e-8 and v6e-8 are 8), and pods over many hosts: v5p-16 to
v5p-256 (8 to 128 chips), v6e-64, v6e-256, h100x16, h100x32, h100x64, and v5p-64x2 (two v5p-64
slices over DCN: the config runs with `mesh.dcn` = 2, its `data` axis spanning the slices). The
programs are the run's own (`cfpo_jax.aot.programs`): update, prepare (old-logprob and reference
passes), the sampler's prefill and decode chunk with the config's KV cache, the reward model's
forward (align_llama), at each config's shapes with the model's shape from benchmarks/shapes.py,
on the config's mesh over the target's chips (`-1` axes take the rest). One row per (config, target, program):

* compiled / error; kernels: the fused-kernel custom calls in the compiled HLO;
* per-chip GB (1e9 bytes): arguments, temporaries, peak (= args + out − aliased + temp) against
  the chip's HBM, and whether it fits;
* compile s (on this host; 2 shared cores when recorded);
* per-chip FLOPs of the compiled program, counted from its HLO's matmuls (`report.hlo_dot_flops`:
  every trip of a loop; fused attention kernels are custom calls and not counted) next to the
  analytic model FLOPs per chip (6·params·tokens for the update, 2·params·tokens per forward;
  for a mixture of experts the params a token runs through: k of the E experts, `programs.active_params`),
  and their ratio (> 1: recomputation such as remat, or waste);
* bound ms: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip — a lower bound on the step,
  never a time. The GPU compiler reports no bytes: there the bound is FLOPs / peak alone, marked
  "(FLOPs)" — weaker still (a decode step is bandwidth-bound).

`--side rollout|learner`: the disaggregated layout (issue 32, `mesh.rollout_devices`) — the
target's devices host by host, the first `mesh.rollout_devices` of them (half the chips where the
config leaves it 0) the rollout mesh with `mesh.rollout`'s sizes, the rest the learner mesh
(`sharding.placement`, as the run splits its devices): the rollout side compiles the sampler's
programs (prefill, decode) on its half of the pod, the learner side the update and prepare on the
other half. The weight move between them is `benchmarks/async_rl.py compile`'s.

After each config whose programs all compiled, a line bounds one RL step from them (`step_bound`):
each program's bound times the calls a step makes of it, for a rollout in which every completion
runs to max_new_tokens — a lower bound on such a step, not a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; nothing runs

# Run as a script from a checkout: the package is the directory above this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import chips  # noqa: E402
import shapes  # noqa: E402
from cfpo_jax import config as config_lib  # noqa: E402
from cfpo_jax import data, policy, sharding  # noqa: E402
from cfpo_jax.aot import programs, report, targets  # noqa: E402
from cfpo_jax.rewards import registry  # noqa: E402

# Per target, the configs recorded on it in benchmarks/README.md: those whose docstring names that
# hardware, and the slice a user would pick (v5e-8 for 0.5B–1.5B; v5p-8 and v6e-8 for 7B/8B, with
# the -v5e/-v6e/-v5p sizes that fit it). The default of --configs.
CONFIGS = {
    "h100x1": ("configs/gsm8k_qwen.py:0.5b", "configs/gsm8k_qwen.py:1.5b", "configs/gsm8k_qwen_lora.py",
               "configs/code_qwen.py:1.5b"),
    "h100x8": ("configs/math_qwen.py:1.5b", "configs/math_qwen.py:3b", "configs/math_qwen.py:7b",
               "configs/align_llama.py", "configs/code_qwen.py:7b", "configs/dapo_qwen.py:cfpo"),
    "v5e-8": ("configs/gsm8k_qwen.py:0.5b", "configs/gsm8k_qwen.py:1.5b", "configs/math_qwen.py:1.5b-v5e"),
    "v6e-8": ("configs/math_qwen.py:7b-v6e", "configs/align_llama.py:v6e", "configs/gsm8k_qwen_lora.py",
              "configs/code_qwen.py:7b"),
    "v5p-8": ("configs/math_qwen.py:7b-v5p", "configs/align_llama.py", "configs/gsm8k_qwen_lora.py",
              "configs/code_qwen.py:7b", "configs/dapo_qwen.py:cfpo"),
}
PROGRAMS = ("update", "prepare", "prefill", "decode", "reward")
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


def policy_model_config(config):
    """The policy's ModelConfig as the trainer loads it (`policy.load`'s overrides)."""
    return shapes.model_config(
        shapes.shape_of_hub_id(config.model.path),
        param_dtype=config.lora.base_dtype or config.model.param_dtype, dtype=config.model.dtype,
        remat=config.model.remat, remat_policy=config.model.remat_policy,
        attention=config.model.attention, unroll_layers=config.model.unroll_layers,
        moe_matmul=config.model.moe_matmul)


def reward_models(config):
    """(hub id, ModelConfig) of each `rm:` reward, in the reward model's dtype."""
    out = []
    for name in config.rewards.fns:
        if name.startswith(registry.REWARD_MODEL_PREFIX):
            path = name[len(registry.REWARD_MODEL_PREFIX):]
            dtype = config.rewards.rm_dtype or config.model.dtype
            out.append((path, shapes.model_config(shapes.shape_of_hub_id(path), param_dtype=dtype,
                                                  dtype=dtype, attention=config.model.attention,
                                                  num_labels=1)))
    return out


def make_mesh(config, target, devices):
    """The config's mesh over the target's chips, as the trainer builds it (`policy.make_mesh`:
    its micro-batch must split over the batch axes); a multi-slice target's slices are `mesh.dcn`
    (the config's, or the target's count where the config leaves it at 1)."""
    if config.mesh.dcn not in (1, target.slices):
        raise ValueError(f"mesh.dcn={config.mesh.dcn} but target {target.name} has {target.slices} slice(s)")
    config.mesh.dcn = target.slices
    return policy.make_mesh(config, devices)


SIDES = {"rollout": ("prefill", "decode"), "learner": ("update", "prepare")}


def side_mesh(config, target, devices, side):
    """The mesh of one side of the disaggregated layout over `target`'s devices (module doc):
    devices ordered host by host, split by `sharding.placement` at `mesh.rollout_devices` (half
    of them where the config says 0)."""
    if target.slices > 1:
        raise ValueError(f"--side over the {target.slices} slices of {target.name} is not supported")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    config.mesh.rollout_devices = config.mesh.rollout_devices or len(ordered) // 2
    rollout, learner = sharding.placement(config.mesh, ordered)
    return rollout if side == "rollout" else learner


def rows_for(spec, target, config, mesh, only=PROGRAMS):
    model = policy_model_config(config)
    built = {}
    if {"update", "prepare"} & set(only):
        built.update(programs.learner_programs(config, model, mesh))
    if {"prefill", "decode"} & set(only):
        built.update(programs.sampler_programs(config, model, mesh))
    for _, rm in reward_models(config) if "reward" in only else ():
        built["reward"] = programs.reward_program(config, rm, mesh)
    with jax.default_matmul_precision("default"):
        for name, program in built.items():
            if name not in only:
                continue
            row = report.compile_program(program, mesh)
            row.update(config=spec.removeprefix("configs/"), target=target.name, program=name,
                       chip_bytes=target.chip_bytes, model_flops=program.model_flops / mesh.size,
                       tokens=program.tokens)
            row["fits"] = bool(row["compiled"] and row["peak"] <= target.chip_bytes)
            chip = chips.lookup(mesh.devices.flat[0].device_kind)
            if row["compiled"] and chip:
                row["bound_s"] = max(row["flops"] / chip.bf16_flops,
                                     (row.get("bytes_accessed") or 0) / chip.hbm_bytes_per_s)
            yield row


def step_bound(config, rows):
    """(seconds, {program: calls}): a lower bound on one RL step of `config` from its programs'
    per-call bounds, None if one is missing. Calls per step, for a rollout of B prompts × G
    samples whose completions all run to N = max_new_tokens: the update num_epochs ×
    num_minibatches times; prepare once; the prefill ⌈B / M⌉ times (each distinct prompt is
    prefilled once, M at a time); the decode step ⌈B·G·N / slots⌉ times (every slot busy every
    step: continuous batching at best); the reward model's forward ⌈B·G / its rows⌉ times."""
    by_name = {row["program"]: row for row in rows}
    if any(not row.get("bound_s") for row in rows) or not {"update", "prefill", "decode"} <= set(by_name):
        return None, {}
    rl, s = config.rl, config.sampling
    rollout = config.data.batch_size * rl.group_size
    prefill_prompts = by_name["prefill"]["tokens"] // (data.bucket_width(s.max_prompt_len) - 1)
    calls = dict(update=rl.num_epochs * rl.num_minibatches, prepare=1,
                 prefill=-(-config.data.batch_size // prefill_prompts),
                 decode=-(-rollout * s.max_new_tokens // by_name["decode"]["tokens"]))
    if "reward" in by_name:
        calls["reward"] = -(-rollout // (by_name["reward"]["tokens"] // config.rewards.rm_max_len))
    calls = {name: n for name, n in calls.items() if name in by_name}
    return sum(by_name[name]["bound_s"] * n for name, n in calls.items()), calls


def cells(row):
    if not row["compiled"]:
        return (row["config"], row["target"], row["program"], "**no**: " + row["error"].replace("|", "/"),
                "", "", "", "", "", f"{row['compile_s']:.0f}", "", "", "", "")
    ratio = row["flops"] / row["model_flops"] if row["model_flops"] else float("nan")
    bound = f"{row['bound_s'] * 1e3:.1f}" if row.get("bound_s") else "—"
    if row.get("bound_s") and not row.get("bytes_accessed"):
        bound += " (FLOPs)"
    return (row["config"], row["target"], row["program"], "yes", ", ".join(row["kernels"]) or "—",
            f"{row['args'] / GB:.2f}", f"{row['temp'] / GB:.2f}", f"{row['peak'] / GB:.2f}",
            f"{row['chip_bytes'] / GB:.1f} " + ("yes" if row["fits"] else "**no**"),
            f"{row['compile_s']:.0f}", f"{row['flops']:.3g}", f"{row['model_flops']:.3g}",
            f"{ratio:.2f}", bound)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, choices=sorted(targets.TARGETS))
    parser.add_argument("--configs", nargs="+", help="config files with their argument (default: the target's "
                        "recorded configs, CONFIGS)")
    parser.add_argument("--set", nargs="*", default=(), metavar="SECTION.FIELD=VALUE",
                        help="config overrides (e.g. rl.micro_batch_size=8 model.remat_policy=full)")
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    parser.add_argument("--side", choices=sorted(SIDES), help="one side of the disaggregated layout: its "
                        "programs on its half of the target's devices (module doc)")
    parser.add_argument("--json", help="write the rows as a JSON list here")
    args = parser.parse_args()
    target = targets.get(args.target)
    specs = args.configs or CONFIGS.get(target.name)
    if not specs:
        parser.error(f"no configs are recorded for {target.name} (only for {', '.join(CONFIGS)}): "
                     "name them with --configs")
    devices = list(targets.devices(target.name))
    print(f"jax {jax.__version__}; {target.name}: {len(devices)} × {devices[0].device_kind} on {target.hosts} "
          f"host(s), {target.slices} slice(s) (compile-only); "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; per-chip GB = 1e9 bytes")
    header = ("config", "target", "program", "compiled", "kernels", "args GB", "temp GB", "peak GB",
              "chip GB fits", "compile s", "FLOPs/chip", "model FLOPs/chip", "ratio", "bound ms")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    rows = []
    only = [p for p in args.programs if not args.side or p in SIDES[args.side]]
    for spec in specs:
        config = load_config(spec, args.set)
        if args.side:
            mesh = side_mesh(config, target, devices, args.side)
            print(f"{spec}, {args.side} side: {mesh.size} of {len(devices)} chips on hosts "
                  f"{sorted({d.process_index for d in mesh.devices.flat})}, mesh {dict(mesh.shape)}", flush=True)
        else:
            mesh = make_mesh(config, target, devices)
        config_rows = []
        for row in rows_for(spec, target, config, mesh, only):
            if args.side:
                row.update(side=args.side, program=f"{row['program']} ({args.side} half)")
            rows.append(row)
            config_rows.append(row)
            print("| " + " | ".join(cells(row)) + " |", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        bound, calls = step_bound(config, config_rows)
        if bound is not None:
            print(f"\n{spec} on {target.name}: RL step ≥ {bound:.1f} s (a bound: every completion "
                  f"max_new_tokens long; calls {calls})\n", flush=True)


if __name__ == "__main__":
    main()
