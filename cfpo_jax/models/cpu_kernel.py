"""The C++ decode attention for XLA:CPU (decode_attention_cpu.cc beside this file), built on first
use and called through `jax.ffi`: attention.py's "native" decode kernel.

XLA:CPU has no Pallas backend, and its own fusions of the decode attention read every cache slot
at a third of the box's bandwidth (benchmarks/README.md, "A C++ decode attention for XLA:CPU").
The kernel is a single C++ file against jax's FFI headers (`jax.ffi.include_dir()`), compiled by
the host's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++` on PATH) with `-O3 -march=native`
into `$CFPO_JAX_KERNEL_CACHE` (default `~/.cache/cfpo_jax/kernels`), under a name that hashes the
source, the compile command, jax's version and the CPU's model and flags, so a shared home
directory never hands one CPU another's build. The shared object is written to a temporary name
and renamed into place (a concurrent or killed build leaves no half file). `available()` says
whether it built (with the reason when not); nothing here runs at import.
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

SOURCE = os.path.join(os.path.dirname(__file__), "decode_attention_cpu.cc")
TARGET = "cfpo_decode_attention"
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
    command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), SOURCE, *_LIBRARIES]
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), jax.__version__.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"decode_attention_cpu-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=_cache_dir())
    os.close(fd)
    try:
        result = subprocess.run([*command, "-o", partial], capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"{os.path.basename(compiler)} failed on {SOURCE}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


_LOAD_LOCK = threading.Lock()  # the sampler's threads (async rollout) may ask at once: build and register once


@functools.cache
def _load() -> tuple[bool, str]:
    try:
        library = ctypes.cdll.LoadLibrary(_build())
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.CfpoDecodeAttention), platform="cpu")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        warnings.warn(f"the C++ decode attention for CPU is unavailable ({error}); decode attention on CPU "
                      "falls back to the 'reduce' kernel")
        return False, str(error)
    return True, ""


def available() -> tuple[bool, str]:
    """(whether the kernel is built and registered, the reason when not); builds it on first call."""
    with _LOAD_LOCK:
        return _load()


def decode_attention(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B):
    """The kernel on one device's arrays (see decode_attention_cpu.cc): [B, N, H] in q's dtype."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the 'native' decode attention kernel is unavailable: {reason}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_BxNxH.shape, q_BxNxH.dtype), vmap_method="sequential")
    return call(q_BxNxH, k_BxKxSxH, v_BxKxSxH, length_B.astype("int32"))
