"""Which kernel runs `transformer.dense`'s compute-dtype matmuls: XLA's dot, or — for the sampler
on CPU — the C++ kernel of `cpu_kernel` (matmul_cpu.cc), "native".

| implementation | where                   | what                                                                     |
| -------------- | ----------------------- | ------------------------------------------------------------------------ |
| "xla"          | everywhere              | `jnp.matmul` (on CPU with float32 accumulation, see `transformer.dense`) |
| "native"       | CPU, float32 / bfloat16 | the C++ kernel: float32 sums (bfloat16: rounded once), as XLA's          |
| "auto"         | (default)               | "native" on CPU for float32 / bfloat16 where the kernel builds with its AVX-512 (BF16) path and no multi-device mesh is given; else "xla" |

The choice is made at trace time: `decoding.prefill` and `decoding.decode_step` trace their
blocks inside `kernel(name)`, so the trainer (whose matmuls need gradients, which the FFI call does
not have) always traces "xla". jit's cache does not key on the context: the sampler's programs
take the kernel as a static argument (`sampling.Settings.matmul`), so each kernel has its own
compiled program. The kernel's sums are float32 (over exact products for bfloat16, rounded to
bfloat16 once), like XLA's, in another order; tests/unit/models/test_matmul.py compares it with
numpy and with XLA. Under a mesh the kernel runs per shard: rows split over the batch axes
('data', 'fsdp', 'expert'), the weights whole on every shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cfpo_jax.models import cpu_kernel
from cfpo_jax.models.attention import _BATCH_AXES, target_platform

IMPLEMENTATIONS = ("auto", "xla", "native")
_CURRENT = contextvars.ContextVar("cfpo_jax_matmul", default="xla")


def resolve(implementation: str, dtype, mesh=None, platform: str | None = None) -> str:
    """The kernel that runs: `implementation`, or for "auto" "native" on CPU for float32 or
    bfloat16 where the kernel builds vectorized and `mesh` has at most one device, else "xla"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"matmul implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    platform = platform or target_platform()
    supported = jnp.dtype(dtype) in cpu_kernel.MATMUL_DTYPES
    if implementation == "auto":
        one_device = mesh is None or mesh.size == 1
        fits = platform == "cpu" and supported and one_device and cpu_kernel.matmul_vectorized()
        return "native" if fits else "xla"
    if implementation == "native" and not (platform == "cpu" and supported):
        raise ValueError(f"matmul 'native' is a CPU kernel for float32 and bfloat16; got platform {platform!r}, "
                         f"dtype {jnp.dtype(dtype).name}")
    return implementation


@contextlib.contextmanager
def kernel(implementation: str):
    """`dense` calls traced inside run their compute-dtype matmuls with `implementation` ("xla"
    or "native", as `resolve` returns)."""
    if implementation not in IMPLEMENTATIONS[1:]:
        raise ValueError(f"matmul kernel {implementation!r}; valid: {', '.join(IMPLEMENTATIONS[1:])}")
    token = _CURRENT.set(implementation)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def native_applies(x_dtype, kernel_dtype) -> bool:
    """Whether a `dense` call being traced runs the native kernel (operands both float32 or both
    bfloat16, the output in their dtype)."""
    return (_CURRENT.get() == "native" and jnp.dtype(x_dtype) == jnp.dtype(kernel_dtype)
            and jnp.dtype(x_dtype) in cpu_kernel.MATMUL_DTYPES)


def native(rows_RxI, kernel_IxO):
    """rows · kernel by the C++ kernel, per shard of the mesh in context (rows split over the batch
    axes when they divide, the kernel whole): [R, O] in their dtype."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cpu_kernel.matmul(rows_RxI, kernel_IxO)
    rows = tuple(a for a in _BATCH_AXES if a in mesh.axis_names)
    if rows_RxI.shape[0] % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    spec = P(rows or None, None)
    return jax.shard_map(cpu_kernel.matmul, mesh=mesh, in_specs=(spec, P(None, None)), out_specs=spec,
                         check_vma=False)(rows_RxI, kernel_IxO)
