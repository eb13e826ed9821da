"""The experts' grouped matmul compiled for the chips: `jax.lax.ragged_dot` against the Pallas TPU
kernel megablox (`model.moe_matmul`), one MoE layer's forward + backward on one chip, or with
`--expert N` the model's expert-parallel layer (`moe.sparse_mlp` under its `shard_map`, experts
split over N chips, the tokens all-gathered and reduce-scattered over them) with `--tokens` per chip.

Compile-only (libtpu's and the CUDA plugin's devices on this host): prints, per target and
implementation, whether it compiles, the compiled matmul FLOPs (`cfpo_jax.aot.report`) against
the layer's own (6 · tokens · k · 3 · D · F for forward + backward of the k experts per token),
the per-chip peak bytes, XLA's bytes accessed (a Pallas kernel's own traffic is outside them) and
the compile time. The FLOPs ratio says whether the grouped matmul
computes only the routed rows (≈ 1) or far more (every expert on every row: up to E / k). A Pallas
kernel is a custom call, not an HLO dot: its FLOPs are not in the count ("kernel" column: the
kernels found), so a megablox row counts only the dots outside it.

  python benchmarks/moe_matmul.py                       # Qwen3-30B-A3B's layer, 4096 tokens
  python benchmarks/moe_matmul.py --tokens 1024 --targets v5e-4
  python benchmarks/moe_matmul.py --targets v5e-4 --expert 4   # the shard_map layer over 4 chips
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; nothing runs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from cfpo_jax import sharding  # noqa: E402
from cfpo_jax.aot import report, targets  # noqa: E402
from cfpo_jax.models import moe  # noqa: E402
from cfpo_jax.models.config import MOE_MATMULS  # noqa: E402


def layer_loss(x_NxD, weights_NxK, experts_NxK, gate, up, down, implementation):
    return jnp.sum(moe.grouped_mlp(x_NxD, weights_NxK, experts_NxK, gate, up, down,
                                   implementation=implementation).astype(jnp.float32))


def sharded_layer_loss(x_BxTxD, weights_BxTxK, experts_BxTxK, gate, up, down, implementation):
    return jnp.sum(moe.sparse_mlp(x_BxTxD, weights_BxTxK, experts_BxTxK, gate, up, down,
                                  implementation=implementation).astype(jnp.float32))


def compile_row(target: str, implementation: str, tokens: int, D: int, E: int, F: int, K: int,
                expert: int = 0) -> dict:
    """One layer's gradient compiled for `target`: on one chip (`grouped_mlp`), or with `expert`
    chips the model's `sparse_mlp` over a mesh of them (experts and tokens split over 'expert')."""
    if expert:
        mesh = sharding.make_mesh(1, 1, 1, devices=targets.devices(target)[:expert], expert=expert)
        rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
        spec = lambda shape, dtype=jnp.bfloat16, s=rows: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
        experts = NamedSharding(mesh, P("expert"))
        args = (spec((expert, tokens, D)), spec((expert, tokens, K)), spec((expert, tokens, K), jnp.int32),
                spec((E, D, F), s=experts), spec((E, D, F), s=experts), spec((E, F, D), s=experts))
        loss = sharded_layer_loss
    else:
        mesh = Mesh(np.array(targets.devices(target)[:1]), ("x",))
        spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
        args = (spec((tokens, D)), spec((tokens, K)), spec((tokens, K), jnp.int32), spec((E, D, F)),
                spec((E, D, F)), spec((E, F, D)))
        loss = layer_loss
    grad = jax.jit(jax.grad(loss, argnums=(0, 3, 4, 5)), static_argnums=6)
    options = targets.COMPILER_OPTIONS.get(mesh.devices.flat[0].platform, {})
    start = time.time()
    try:
        with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
            compiled = grad.lower(*args, implementation).compile(compiler_options=options)
    except Exception as e:  # a compile error is the result
        return dict(compiled=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return dict(compiled=True, flops=report.hlo_dot_flops(hlo), peak=peak, kernels=report.kernels(hlo),
                bytes=cost.get("bytes accessed"), seconds=time.time() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["v5e-4", "h100x2"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert", type=int, default=0,
                        help="compile the expert-parallel layer over this many chips (0: grouped_mlp on one chip)")
    a = parser.parse_args()
    ideal = 6 * a.tokens * a.top_k * 3 * a.hidden * a.width
    where = f" per chip, expert-parallel over {a.expert}" if a.expert else ""
    print(f"one MoE layer fwd+bwd: {a.tokens} tokens{where}, D={a.hidden}, E={a.experts}, F={a.width}, "
          f"k={a.top_k}; the layer's own matmul FLOPs {ideal:.3e}")
    print(f"{'target':8} {'matmul':11} {'compiles':8} {'dot FLOPs':>10} {'× own':>6} {'peak GB':>8} "
          f"{'bytes GB':>8} {'compile s':>9}  kernel")
    for target in a.targets:
        for implementation in MOE_MATMULS:
            if implementation == "megablox" and not target.startswith("v"):
                continue  # a TPU kernel
            row = compile_row(target, implementation, a.tokens, a.hidden, a.experts, a.width, a.top_k, a.expert)
            if not row["compiled"]:
                print(f"{target:8} {implementation:11} {'no':8} {row['error']}")
                continue
            print(f"{target:8} {implementation:11} {'yes':8} {row['flops']:10.3e} {row['flops'] / ideal:6.2f} "
                  f"{row['peak'] / 1e9:8.2f} {(row['bytes'] or 0) / 1e9:8.2f} {row['seconds']:9.1f}  "
                  f"{','.join(row['kernels']) or '-'}")


if __name__ == "__main__":
    main()
