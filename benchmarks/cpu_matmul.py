"""The sampler's matmul on CPU: the "native" C++ kernel (cfpo_jax/models/matmul_cpu.cc) against
XLA's dot (what `transformer.dense` runs otherwise: float32, or bfloat16 operands with float32
accumulation rounded to bfloat16), in the same run.

    python benchmarks/cpu_matmul.py                    # SmolLM2-135M's shapes, 32 and 256 rows
    python benchmarks/cpu_matmul.py --rows 8,32 --dtypes bfloat16 --layers 30 --repeats 15

Two tables, each the median over `--repeats` calls with the two kernels alternating:

* per shape: one call per layer's weight (`--layers` distinct weights, so they come from DRAM as
  in a decode step, not from the caches), µs per matmul, GFLOP/s and the weights' read rate;
* a decode step's projections: `--layers` layers of q, k, v, o, gate, up and down in their data
  dependence (each output feeds the next), ms per step — what the projections cost a SmolLM2 decode
  step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfpo_jax.models import cpu_kernel

D, F, Q, KV = 576, 1536, 576, 192  # SmolLM2-135M: hidden, MLP, q and k/v widths
SHAPES = [("q / o", D, Q), ("k / v", D, KV), ("gate / up", D, F), ("down", F, D)]


def xla(x, w):
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _alternating(programs, args, repeats):
    """Median ms of each program, calls alternating (the box's load falls on both)."""
    for program in programs.values():
        jax.block_until_ready(program(*args))
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            times[name].append(_median_ms(lambda: program(*args), 1))
    return {name: statistics.median(t) for name, t in times.items()}


def per_shape(rows, dtype, layers, repeats, rng):
    print(f"\n| rows | {dtype} shape (K x N) | XLA µs | native µs | XLA / native | native GFLOP/s | "
          "native weights GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, K, N in SHAPES:
        x = jnp.asarray(rng.standard_normal((rows, K)), dtype)
        ws = [jnp.asarray(rng.standard_normal((K, N)) * 0.03, dtype) for _ in range(layers)]
        programs = {kernel: jax.jit(lambda x, ws, mm=mm: [mm(x, w) for w in ws])
                    for kernel, mm in (("xla", xla), ("native", cpu_kernel.matmul))}
        ms = _alternating(programs, (x, ws), repeats)
        per_call = {k: v * 1e3 / layers for k, v in ms.items()}
        t = per_call["native"] * 1e-6
        print(f"| {rows} | {name} ({K} x {N}) | {per_call['xla']:.1f} | {per_call['native']:.1f} | "
              f"{per_call['xla'] / per_call['native']:.2f} | {2 * rows * K * N / t / 1e9:.0f} | "
              f"{K * N * jnp.dtype(dtype).itemsize / t / 1e9:.1f} |")


def step(rows, dtype, layers, repeats, rng):
    def weights(K, N):
        return jnp.asarray(rng.standard_normal((K, N)) * 0.03, dtype)

    params = [dict(q=weights(D, Q), k=weights(D, KV), v=weights(D, KV), o=weights(Q, D), gate=weights(D, F),
                   up=weights(D, F), down=weights(F, D)) for _ in range(layers)]

    def projections(mm, x, params):
        for p in params:
            q, k, v = mm(x, p["q"]), mm(x, p["k"]), mm(x, p["v"])
            x = x + mm(q + jnp.tile(k + v, Q // KV), p["o"])  # a stand-in for attention: q, k, v all used
            x = x + mm(mm(x, p["gate"]) * mm(x, p["up"]), p["down"])
        return x

    x = jnp.asarray(rng.standard_normal((rows, D)), dtype)
    programs = {kernel: jax.jit(lambda x, p, mm=mm: projections(mm, x, p))
                for kernel, mm in (("xla", xla), ("native", cpu_kernel.matmul))}
    ms = _alternating(programs, (x, params), repeats)
    flops = 2 * rows * layers * (D * Q + 2 * D * KV + Q * D + 3 * D * F)
    return ms, flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="32,256")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args(argv)
    ok, reason = cpu_kernel.available()
    if not ok:
        print(f"the native kernel is unavailable here: {reason}")
        return 1
    if not cpu_kernel.matmul_vectorized():
        print("note: this CPU has no AVX-512 BF16; the native kernel is its plain loop ('auto' keeps XLA's dot)")
    rng = np.random.default_rng(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
    for dtype in dtypes:
        for rows in rows_list:
            per_shape(rows, dtype, args.layers, args.repeats, rng)
    print(f"\n| rows | dtype | {args.layers} layers' projections | XLA ms | native ms | XLA / native | "
          "native GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in dtypes:
        for rows in rows_list:
            ms, flops = step(rows, dtype, args.layers, args.repeats, rng)
            print(f"| {rows} | {dtype} | q k v o gate up down | {ms['xla']:.1f} | {ms['native']:.1f} | "
                  f"{ms['xla'] / ms['native']:.2f} | {flops / ms['native'] / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
