"""The sampler's C++ kernels for XLA:CPU, built on first use and called through `jax.ffi`:

* decode_attention_cpu.cc, attention.py's "native" decode kernel. XLA:CPU has no Pallas backend,
  and its own fusions of the decode attention read every cache slot at a third of the box's
  bandwidth (benchmarks/README.md, "A C++ decode attention for XLA:CPU").
* matmul_cpu.cc, `transformer.dense`'s "native" float32 / bfloat16 matmul for the sampler:
  XLA:CPU's dot ran the decode step's shapes at ~45 % of the box's bfloat16 peak
  (benchmarks/README.md, "A C++ matmul for the sampler").

The sources (and bfloat16.h, which both include) are C++ against jax's FFI headers
(`jax.ffi.include_dir()`), compiled into one shared object by the host's C++ compiler (`$CXX`,
else `c++`/`g++`/`clang++` on PATH) with `-O3 -march=native` into `$CFPO_JAX_KERNEL_CACHE`
(default `~/.cache/cfpo_jax/kernels`), under a name that hashes the sources, the compile
command, jax's version and the CPU's model and flags, so a shared home directory never hands one
CPU another's build. The shared object is written to a temporary name and renamed into place (a
concurrent or killed build leaves no half file). `available()` says whether it built (with the
reason when not); nothing here runs at import.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax

_HERE = os.path.dirname(__file__)
SOURCES = tuple(os.path.join(_HERE, name) for name in ("decode_attention_cpu.cc", "matmul_cpu.cc"))
HEADERS = (os.path.join(_HERE, "bfloat16.h"),)
TARGETS = {"cfpo_decode_attention": "CfpoDecodeAttention", "cfpo_matmul": "CfpoMatmul"}  # FFI name: symbol
MATMUL_DTYPES = (jax.numpy.dtype("float32"), jax.numpy.dtype("bfloat16"))
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_LIBRARIES = ("-lmvec",) if sys.platform == "linux" else ()  # glibc's vector expf (AVX-512 builds)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> str:
    return os.environ.get("CFPO_JAX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cfpo_jax",
                                                                   "kernels")


def _build() -> str:
    """The path of the shared object, compiling it if this CPU has none yet. Raises RuntimeError
    with the reason when it cannot."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++ on PATH)")
    command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), *SOURCES, *_LIBRARIES]
    texts = []
    for name in (*SOURCES, *HEADERS):
        with open(name, "rb") as f:
            texts.append(f.read())
    key = hashlib.sha256(b"\0".join([*texts, " ".join(command).encode(), jax.__version__.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"cpu_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=_cache_dir())
    os.close(fd)
    try:
        result = subprocess.run([*command, "-o", partial], capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"{os.path.basename(compiler)} failed on {', '.join(SOURCES)}: "
                               f"{result.stderr.strip()[-2000:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


_LOAD_LOCK = threading.Lock()  # the sampler's threads (async rollout) may ask at once: build and register once


@functools.cache
def _load() -> tuple[bool, str, bool]:
    try:
        library = ctypes.cdll.LoadLibrary(_build())
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        warnings.warn(f"the C++ kernels for CPU are unavailable ({error}); on CPU decode attention falls back "
                      "to the 'reduce' kernel and the sampler's matmuls to XLA's")
        return False, str(error), False
    return True, "", bool(library.CfpoMatmulVectorized())


def available() -> tuple[bool, str]:
    """(whether the kernels are built and registered, the reason when not); builds them on first call."""
    with _LOAD_LOCK:
        return _load()[:2]


def matmul_vectorized() -> bool:
    """Whether the matmul kernel was built with its AVX-512 (BF16) path (what "auto" picks it for);
    without it the kernel is a plain loop, slower than XLA's dot."""
    with _LOAD_LOCK:
        return _load()[2]


def decode_attention(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B):
    """The kernel on one device's arrays (see decode_attention_cpu.cc): [B, N, H] in q's dtype."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the 'native' decode attention kernel is unavailable: {reason}")
    call = jax.ffi.ffi_call("cfpo_decode_attention", jax.ShapeDtypeStruct(q_BxNxH.shape, q_BxNxH.dtype),
                            vmap_method="sequential")
    return call(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B.astype("int32"))


def matmul(a_MxK, b_KxN):
    """a · b for a [M, K] and b [K, N], both float32 or both bfloat16, on one device (see
    matmul_cpu.cc): [M, N] in their dtype, float32 sums (for bfloat16 rounded once)."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the 'native' matmul kernel is unavailable: {reason}")
    if a_MxK.ndim != 2 or b_KxN.ndim != 2 or a_MxK.shape[1] != b_KxN.shape[0] or a_MxK.dtype != b_KxN.dtype or (
            a_MxK.dtype not in MATMUL_DTYPES):
        raise ValueError(f"the 'native' matmul takes a [M, K] and b [K, N], both float32 or both bfloat16; got "
                         f"{a_MxK.dtype}{list(a_MxK.shape)} and {b_KxN.dtype}{list(b_KxN.shape)}")
    call = jax.ffi.ffi_call("cfpo_matmul", jax.ShapeDtypeStruct((a_MxK.shape[0], b_KxN.shape[1]), a_MxK.dtype),
                            vmap_method="sequential")
    return call(a_MxK, b_KxN)
