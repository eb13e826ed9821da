"""Test session setup: CPU only, 8 fake devices for sharding tests, no network, the fixtures on the path.

Layout: unit/ mirrors the package (a test beside what it tests), integration/ runs the trainer and
the other entry points end to end, configs/ checks the shipped configs, fixtures/ is what they share.

The environment must be set before anything imports jax, which is why it lives here at import
time and not in a fixture. Single-device tests are unaffected: unsharded arrays live on device 0.
"""

import os
import sys

# The fixtures are imported as `tests.fixtures.*`, and reward functions and environments are named
# "tests.fixtures.rewards:<name>" like a user's (reward workers get this path too): the
# repository root goes first on the path, however pytest was started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# setdefault: a GPU machine can run the GPU-only tests with JAX_PLATFORMS=cuda,cpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF conversions (cfpo_jax.models.gguf) go to a per-session cache, shared with the subprocesses
# tests start, instead of the user's ~/.cache.
if "CFPO_JAX_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CFPO_JAX_CACHE"] = tempfile.mkdtemp(prefix="cfpo-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["CFPO_JAX_CACHE"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
