"""Learner throughput: the trainer's jitted update (forward + backward + AdamW) against the chip's
measured matmul peak.

    python benchmarks/train_step.py                  # GPU: 0.5B, 1.5B, 7B shapes, remat off / full
    python benchmarks/train_step.py --small          # CPU smoke run, tiny shape (~2 min on 2 cores)
    python benchmarks/train_step.py --shapes 7b --remat full --lora-rank 64   # issue 15's LoRA row
    python benchmarks/train_step.py --shapes 1.5b --remat full,dots_with_no_batch_dims --batch 16

Per shape (Qwen2.5, benchmarks/shapes.py) and remat setting: random weights in float32 (the master
copy AdamW updates), bfloat16 compute, `--batch` sequences of `--prompt-len` + `--new-tokens`
tokens (default 1,024 + 1,024), one minibatch, no micro-batching, CFPO on random advantages. The
function timed is `cfpo_jax.learner.make_update` — the trainer's own update, state donated — jitted
on a mesh of all local devices (one GPU: one device).

With `--lora-rank R` > 0 each (shape, remat) also gets a LoRA row beside its full fine-tuning row:
the same shape, batch and update, with adapters of rank R (alpha = R) on all seven projections
(q k v o gate up down) as configs/gsm8k_qwen_lora.py, a bfloat16 frozen base passed to the update
as its `frozen` argument (as the trainer does), and only the float32 adapters trained (the AdamW
state holds adapters only). It prints:

* step s: median wall time of `--steps` updates after a compile call, until the metrics are on
  the host;
* tokens/s: batch × (prompt + completion) tokens per step time;
* TFLOP/s: model FLOPs per step / step time. Model FLOPs = 3 × forward (backward = 2 × forward)
  of the matmuls the model needs — q/k/v/o projections and the SwiGLU MLP for every token, causal
  attention (2 · 2 · N · H · T² / 2 per layer per sequence), the unembedding for the completion
  columns only (what `sequence_logprobs(num_completion=N)` computes) — without remat's recompute,
  as MFU is usually counted (PaLM, MaxText). A LoRA row counts what its update computes: the
  frozen projections, MLP and unembedding need input gradients only (2 × forward), attention and
  the adapter matmuls 3 × forward;
* MFU: TFLOP/s over the bf16 matmul peak measured in the same run (`--peak-size`³ matmuls on one
  device) times the number of devices the update runs on;
  MFU (spec): over the chip's published dense bf16 peak instead (benchmarks/chips.py; "—" for a
  chip not in that table);
* peak GB: XLA's compiled per-device peak (arguments + outputs − aliased + temporaries); on a GPU
  also the allocator's high-water mark (`memory_stats()['peak_bytes_in_use']`). A setting whose
  compiled peak exceeds the device memory is reported and not run.

`--json PATH` also writes the rows as JSON (for benchmarks/accelerator.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

# Run as a script from a checkout: the package is the directory above this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

import chips  # noqa: E402
import shapes  # noqa: E402
from cfpo_jax import config as config_lib  # noqa: E402
from cfpo_jax import batch as batch_lib  # noqa: E402
from cfpo_jax import learner, models, sharding, state  # noqa: E402
from cfpo_jax.models.config import LORA_TARGETS, REMAT_POLICIES  # noqa: E402

GB = 1e9


def model_flops_per_step(config, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Matmul FLOPs of one update (see the module docstring): 3 × forward, or with adapters
    (`config.lora_rank` > 0) 2 × the frozen matmuls' forward + 3 × attention's and the adapters'."""
    D, F, L = config.hidden_size, config.intermediate_size, config.num_layers
    N, K, H, V = config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size
    T = prompt_len + new_tokens
    per_token_layer = 2 * D * (N + 2 * K) * H + 2 * N * H * D + 2 * 3 * D * F
    attention_per_sequence_layer = 2 * N * H * T * T  # q·k and p·v, causal half of 2 · 2 · N·H·T²
    weights = batch * L * T * per_token_layer + batch * new_tokens * 2 * D * V
    attention = batch * L * attention_per_sequence_layer
    if not config.lora_rank:
        return 3.0 * (weights + attention)
    in_out = dict(q=(D, N * H), k=(D, K * H), v=(D, K * H), o=(N * H, D), gate=(D, F), up=(D, F), down=(F, D))
    adapters = batch * L * T * sum(2 * config.lora_rank * sum(in_out[t]) for t in config.lora_targets)
    return 2.0 * weights + 3.0 * (attention + adapters)


def measure_peak_tflops(size: int, dtype=jnp.bfloat16, repeats: int = 10) -> float:
    """bf16 matmul throughput of this device: a chain of `repeats` [size]³ matmuls in one program."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype) / size**0.5
    b = jax.random.normal(jax.random.key(1), (size, size), dtype) / size**0.5

    @jax.jit
    def chain(a, b):
        def body(x, _):
            return jnp.dot(x, b, preferred_element_type=jnp.float32).astype(dtype), None
        return jax.lax.scan(body, a, None, length=repeats)[0]

    chain(a, b).block_until_ready()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        chain(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 * repeats / min(times) / 1e12


def rl_config(objective: str = "cfpo") -> ml_collections.ConfigDict:
    rl = config_lib.base_config().rl
    rl.objective = objective
    rl.num_epochs = 2  # off policy: the update reads old logprobs, as in the paper's settings
    return rl


def run_one(shape: str, remat: str, lora_rank: int, *, batch: int, prompt_len: int, new_tokens: int,
            steps: int, device_bytes: float | None):
    """One row of the table: compile, check the memory, time `steps` updates. With `lora_rank` > 0
    only adapters train, on a bfloat16 frozen base."""
    lora = dict(lora_rank=lora_rank, lora_alpha=float(lora_rank), lora_targets=LORA_TARGETS) if lora_rank else {}
    model_config = shapes.model_config(shape, param_dtype="bfloat16" if lora_rank else "float32",
                                       dtype="bfloat16", remat=remat != "off",
                                       remat_policy="full" if remat == "off" else remat, **lora)
    # Trained / frozen split as the trainer's `build`: adapters / base with LoRA, else all / nothing.
    trained = nnx.LoRAParam if lora_rank else nnx.Param
    mesh = sharding.make_mesh(1, -1, 1)
    optim = config_lib.base_config().optim
    optim.weight_decay = 0.01
    tx, schedule = state.make_optimizer(optim, total_updates=1000)
    rl = rl_config()

    abstract_model = nnx.eval_shape(lambda: models.Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, abstract_frozen = nnx.split(abstract_model, trained, ...)
    param_sh = sharding.param_shardings(mesh, abstract_params)
    frozen_sh = sharding.param_shardings(mesh, abstract_frozen)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_params = jax.tree.map(with_sharding, abstract_params, param_sh)
    abstract_frozen = jax.tree.map(with_sharding, abstract_frozen, frozen_sh)
    init_state, abstract_state = state.create_state(abstract_params, tx, mesh, seed=0, beta=0.0,
                                                    adapters=bool(lora_rank))
    state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
    batch_sh = sharding.batch_sharding(mesh)
    T = prompt_len + new_tokens
    pure_update = learner.make_update(graphdef, tx, schedule, rl, temperature=1.0,
                                      max_len=new_tokens, micro_batch_size=0, packed=False)
    # `frozen` (the frozen base with LoRA, else empty) is an argument, as in the trainer: jit would
    # embed a closed-over array in the program as a constant.
    update = jax.jit(pure_update, in_shardings=(state_sh, frozen_sh, batch_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, PS())), donate_argnums=0)
    rng = np.random.default_rng(0)
    host_batch = batch_lib.Batch(
        tokens=rng.integers(0, model_config.vocab_size, (batch, T), dtype=np.int32),
        attn=np.ones((batch, T), np.int32),
        mask=np.ones((batch, new_tokens), np.float32),
        adv=rng.normal(size=batch).astype(np.float32),
        old_logp=np.full((batch, new_tokens), -np.log(model_config.vocab_size), np.float32),
    )
    abstract_batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh), host_batch)

    start = time.time()
    compiled = update.lower(abstract_state, abstract_frozen, abstract_batch).compile()
    compile_s = time.time() - start
    memory = compiled.memory_analysis()
    compiled_peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    row = dict(shape=shape, remat=remat, lora_rank=lora_rank, batch=batch, T=T, compile_s=compile_s, compiled_peak=compiled_peak,
               flops=model_flops_per_step(model_config, batch, prompt_len, new_tokens))
    if device_bytes is not None and compiled_peak > device_bytes:
        row["skipped"] = f"compiled peak {compiled_peak / GB:.1f} GB > {device_bytes / GB:.1f} GB"
        return row

    # Random weights made on device in their shardings (nothing on the host).
    params, frozen = jax.jit(
        lambda: nnx.split(models.Transformer(model_config, rngs=nnx.Rngs(0)), trained, ...)[1:],
        out_shardings=(param_sh, frozen_sh))()
    state = init_state(params)
    device_batch = jax.tree.map(lambda v: jax.device_put(v, batch_sh), host_batch)
    state, metrics = compiled(state, frozen, device_batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, device_batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    row["step_s"] = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    row["allocator_peak"] = stats.get("peak_bytes_in_use")
    del state
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="CPU smoke run: tiny shape, 4 × (64 + 64) tokens, LoRA rank 8")
    parser.add_argument("--shapes", default="0.5b,1.5b,7b")
    parser.add_argument("--remat", default="off,full", help="comma list of off and remat policies")
    parser.add_argument("--batch", type=int, default=8, help="sequences per update")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=64,
                        help="adapter rank of the LoRA row beside each full fine-tuning row; 0: no LoRA rows")
    parser.add_argument("--peak-size", type=int, default=8192, help="matmul size for the peak measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # SHAPE:REMAT:LORA_RANK, run in a child process
    args = parser.parse_args()
    if args.small:
        args.shapes, args.batch, args.prompt_len, args.new_tokens, args.peak_size = "tiny", 4, 64, 64, 1024
        args.lora_rank = 8  # the tiny shape's hidden size is 64
    device = jax.devices()[0]
    device_bytes = (device.memory_stats() or {}).get("bytes_limit")
    if args.row:
        shape, remat, lora_rank = args.row.split(":")
        row = run_one(shape, remat, int(lora_rank), batch=args.batch, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens, steps=args.steps, device_bytes=device_bytes)
        print("ROW " + json.dumps(row))
        return
    for shape in args.shapes.split(","):
        if shape not in shapes.SHAPES:
            parser.error(f"unknown shape {shape!r}; valid: {', '.join(shapes.SHAPES)}")
    for remat in args.remat.split(","):
        if remat != "off" and remat not in REMAT_POLICIES:
            parser.error(f"unknown remat {remat!r}; valid: off, {', '.join(REMAT_POLICIES)}")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be ≥ 0 (0: no LoRA rows); got {args.lora_rank}")

    peak_tflops = measure_peak_tflops(args.peak_size)
    device_kind = device.device_kind
    chip = chips.lookup(device_kind)
    published = (f"{chip.bf16_flops / 1e12:.4g} TFLOP/s ({chip.source})" if chip
                 else "unknown (not in benchmarks/chips.py)")
    print(f"{device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), jax {jax.__version__}; "
          f"bf16 matmul peak measured: {peak_tflops:.3g} TFLOP/s ({args.peak_size}³); published: {published}")
    header = ("shape", "remat", "trained", "batch × T", "step s", "tokens/s", "TFLOP/s", "MFU", "MFU (spec)",
              "compiled peak GB", "allocator peak GB", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    # Each row in a fresh process: its own allocator high-water mark, nothing left by the last row.
    del device
    rows = []
    ranks = [0, args.lora_rank] if args.lora_rank else [0]
    for shape, remat, lora_rank in itertools.product(args.shapes.split(","), args.remat.split(","), ranks):
        trained = f"LoRA r{lora_rank}" if lora_rank else "all"
        command = [sys.executable, os.path.abspath(__file__), f"--row={shape}:{remat}:{lora_rank}",
                   f"--batch={args.batch}", f"--prompt-len={args.prompt_len}",
                   f"--new-tokens={args.new_tokens}", f"--steps={args.steps}"]
        child = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
        if child.returncode or not lines:
            error = (child.stderr.strip().splitlines() or ['?'])[-1]
            print(f"| {shape} | {remat} | {trained} | failed: {error} |")
            rows.append(dict(shape=shape, remat=remat, lora_rank=lora_rank, failed=error))
            continue
        row = json.loads(lines[-1][4:])
        if "skipped" in row:
            cells = (shape, remat, trained, f"{row['batch']} × {row['T']}", "—", "—", "—", "—", "—",
                     f"{row['compiled_peak'] / GB:.1f}", f"not run: {row['skipped']}",
                     f"{row['compile_s']:.0f}")
        else:
            tflops = row["flops"] / row["step_s"] / 1e12
            # The update runs on all local devices (a TPU host's 4 or 8 chips): MFU is per chip.
            chips_used = jax.device_count()
            row.update(tokens_per_s=row["batch"] * row["T"] / row["step_s"], tflops=tflops,
                       mfu=tflops / peak_tflops / chips_used,
                       mfu_spec=tflops * 1e12 / chip.bf16_flops / chips_used if chip else None)
            allocator = row["allocator_peak"]
            cells = (shape, remat, trained, f"{row['batch']} × {row['T']}", f"{row['step_s']:.3f}",
                     f"{row['tokens_per_s']:,.0f}", f"{tflops:.3g}", f"{row['mfu']:.1%}",
                     "—" if chip is None else f"{row['mfu_spec']:.1%}", f"{row['compiled_peak'] / GB:.2f}",
                     "n/a (CPU)" if allocator is None else f"{allocator / GB:.2f}", f"{row['compile_s']:.0f}")
        rows.append(row)
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device_kind=device_kind, device_count=jax.device_count(),
                           peak_tflops_measured=peak_tflops, peak_flops_spec=chip.bf16_flops if chip else None,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
