"""The sampler's "native" float32 / bfloat16 matmul (cfpo_jax/models/matmul_cpu.cc, built here by
the host's compiler) against numpy in float64 and against XLA's dot; how `models.matmul` picks it;
and the sampler with it against the sampler with XLA's dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfpo_jax import sampling
from cfpo_jax.models import ModelConfig, Transformer, cpu_kernel, matmul
from cfpo_jax.models.transformer import dense
from cfpo_jax.sharding import make_mesh

needs_compiler = pytest.mark.skipif(cpu_kernel._compiler() is None,
                                    reason="no C++ compiler on this host to build the 'native' CPU kernel")

# (M, K, N): the decode step's shape; odd K and a column tail; one row; rows across the kernel's
# 256-row chunks with a tail of a row block.
SHAPES = [(32, 576, 1536), (5, 7, 50), (13, 577, 49), (1, 1, 1), (300, 64, 97)]


def operands(M, K, N, seed=0, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((M, K)), dtype), jnp.asarray(rng.standard_normal((K, N)), dtype))


def bf16_ulp(x):
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 1e-30))) - 7)


@needs_compiler
@pytest.mark.parametrize("M, K, N", SHAPES)
def test_native_bfloat16_matmul_matches_numpy_and_xla(M, K, N):
    a, b = operands(M, K, N)
    got = np.asarray(jax.jit(cpu_kernel.matmul)(a, b), np.float64)
    assert got.shape == (M, N)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    # float32 sums of K exact products, then one rounding to bfloat16 (half an ulp).
    sum_bound = K * 2.0**-24 * (np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64)))
    assert np.all(np.abs(got - exact) <= 0.5 * bf16_ulp(exact) + sum_bound * 1.01)
    xla = np.asarray(jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16), np.float64)
    assert np.all(np.abs(got - xla) <= bf16_ulp(xla))  # at most one bfloat16 step from XLA's result


@needs_compiler
@pytest.mark.parametrize("M, K, N", SHAPES)
def test_native_float32_matmul_matches_numpy_and_xla(M, K, N):
    a, b = operands(M, K, N, dtype=jnp.float32)
    got = np.asarray(jax.jit(cpu_kernel.matmul)(a, b), np.float64)
    assert got.shape == (M, N) and cpu_kernel.matmul(a, b).dtype == jnp.float32
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    # K float32 roundings of the products and sums (the standard bound for a float32 dot product).
    sum_bound = K * 2.0**-23 * (np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64)))
    assert np.all(np.abs(got - exact) <= sum_bound)
    xla = np.asarray(jnp.matmul(a, b), np.float64)
    assert np.all(np.abs(got - xla) <= 2 * sum_bound)


@needs_compiler
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_native_matmul_rows_do_not_depend_on_their_batch(dtype):
    a, b = operands(37, 96, 130, seed=1, dtype=dtype)
    together = np.asarray(cpu_kernel.matmul(a, b), np.float32)
    for m in (0, 7, 8, 36):
        alone = np.asarray(cpu_kernel.matmul(a[m:m + 1], b), np.float32)
        np.testing.assert_array_equal(alone[0], together[m])


@needs_compiler
def test_native_matmul_keeps_nan_and_inf_in_their_rows():
    a, b = operands(16, 64, 48, seed=2)
    a = a.at[3, 5].set(jnp.nan).at[9, 0].set(jnp.inf)
    b = jnp.abs(b)  # +inf times positive weights stays +inf
    got = np.asarray(cpu_kernel.matmul(a, b), np.float32)
    assert np.isnan(got[3]).all() and np.isposinf(got[9]).all()
    assert np.isfinite(np.delete(got, [3, 9], axis=0)).all()


@needs_compiler
def test_native_matmul_rejects_other_dtypes_and_shapes():
    a, b = operands(4, 8, 16)
    with pytest.raises(ValueError, match=r"both float32 or both bfloat16; got float32\[4, 8\] and bfloat16"):
        cpu_kernel.matmul(a.astype(jnp.float32), b)
    with pytest.raises(ValueError, match=r"got float16\[4, 8\] and float16\[8, 16\]"):
        cpu_kernel.matmul(a.astype(jnp.float16), b.astype(jnp.float16))
    with pytest.raises(ValueError, match=r"got bfloat16\[4, 8\] and bfloat16\[9, 16\]"):
        cpu_kernel.matmul(a, jnp.zeros((9, 16), jnp.bfloat16))


@needs_compiler
def test_dense_runs_the_native_kernel_only_inside_its_context():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 4, 8)), jnp.bfloat16)  # [B, T, N, H]
    kernel = jnp.asarray(np.random.default_rng(4).standard_normal((4, 8, 40)), jnp.bfloat16)  # o: [N, H, D]

    def program():  # a new function per trace: jit's cache does not key on the context
        return jax.jit(lambda x: dense(x, kernel, num_in=2))

    outside = program()(x)
    with matmul.kernel("native"):
        inside = program().lower(x).as_text()
        got = program()(x)
    assert "cfpo_matmul" in inside and "cfpo_matmul" not in program().lower(x).as_text()
    assert got.shape == outside.shape == (2, 3, 40) and got.dtype == jnp.bfloat16
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - np.asarray(outside, np.float64)),
                                 bf16_ulp(np.asarray(outside, np.float64)) * 1.001)
    # Mixed dtypes and the head's float32 logits (`preferred_element_type`) stay XLA's dot.
    with matmul.kernel("native"):
        mixed = jax.jit(lambda x: dense(x.astype(jnp.float32), kernel, num_in=2)).lower(x).as_text()
        head = jax.jit(lambda x: dense(x, kernel, num_in=2, preferred_element_type=jnp.float32)).lower(x).as_text()
    assert "cfpo_matmul" not in mixed and "cfpo_matmul" not in head


def test_resolve_picks_native_only_on_one_cpu_device(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "matmul_vectorized", lambda: True)
    assert matmul.resolve("auto", jnp.bfloat16, platform="cpu") == "native"
    assert matmul.resolve("auto", jnp.float32, platform="cpu") == "native"
    assert matmul.resolve("auto", jnp.float16, platform="cpu") == "xla"
    assert matmul.resolve("auto", jnp.bfloat16, platform="tpu") == "xla"
    assert matmul.resolve("auto", jnp.bfloat16, make_mesh(data=2, fsdp=2, tensor=2), platform="cpu") == "xla"
    monkeypatch.setattr(cpu_kernel, "matmul_vectorized", lambda: False)  # no AVX-512 BF16 (or no compiler)
    assert matmul.resolve("auto", jnp.bfloat16, platform="cpu") == "xla"
    with pytest.raises(ValueError, match="for float32 and bfloat16; got platform 'gpu', dtype bfloat16"):
        matmul.resolve("native", jnp.bfloat16, platform="gpu")
    with pytest.raises(ValueError, match="for float32 and bfloat16; got platform 'cpu', dtype float16"):
        matmul.resolve("native", jnp.float16, platform="cpu")
    with pytest.raises(ValueError, match="matmul implementation 'onednn'; valid: auto, xla, native"):
        matmul.resolve("onednn", jnp.bfloat16)


def small_model(dtype="bfloat16"):
    config = ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, dtype=dtype, qkv_bias=True)
    return Transformer(config, rngs=nnx.Rngs(0))


@needs_compiler
@pytest.mark.parametrize("dtype, use_mesh", [("bfloat16", False), ("bfloat16", True), ("float32", False)])
def test_sampler_with_the_native_matmul_samples_what_xla_does(dtype, use_mesh):
    """Same tokens as with XLA's dot, sampled and greedy, and the same logprobs to a bfloat16 step
    (float32: to rounding); under a mesh the kernel runs per batch shard."""
    model = small_model(dtype)
    prompts = np.random.default_rng(5).integers(0, 96, (6, 7)).tolist()
    mesh = make_mesh(data=2, fsdp=2, tensor=2) if use_mesh else None
    for temperature in (1.0, 0.0):
        runs = {kernel: sampling.generate(model, prompts, max_new_tokens=12, n=2, temperature=temperature,
                                          seed=3, mesh=mesh, matmul=kernel) for kernel in ("xla", "native")}
        np.testing.assert_array_equal(np.asarray(runs["native"].tokens), np.asarray(runs["xla"].tokens))
        np.testing.assert_allclose(np.asarray(runs["native"].logprobs), np.asarray(runs["xla"].logprobs),
                                   atol=2e-2 if dtype == "bfloat16" else 1e-5)


@needs_compiler
def test_sampler_auto_runs_the_native_matmul_on_cpu(capsys):
    sampling.generate(small_model(), [[1, 2, 3]], max_new_tokens=2, temperature=0.0)
    expected = "native matmuls" if cpu_kernel.matmul_vectorized() else "xla matmuls"
    assert expected in capsys.readouterr().out
