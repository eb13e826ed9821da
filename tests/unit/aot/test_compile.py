"""The trainer's and sampler's own programs compiled by the real chip compilers, without the chips.

A small model with head_dim 128 (so splash, paged, cuDNN and the Pallas decode kernel are
eligible), bf16 compute, on (a) a 4-chip TPU v5e slice with fsdp 4 (libtpu's compile-only
devices) and (b) two compile-only H100s (the CUDA plugin with XLA's H100 spec): the update, the
prepare pass (the old-logprob pass: two epochs make the rollout off policy), the sampler's
prefill and decode chunk. Each must compile, hold its platform's fused kernel in the compiled HLO,
and fit a per-chip memory bound computed here from the shapes.

On main 5e8828f the update and old-logprob pass did not even reach the TPU compiler's kernel:
"auto" followed the host (CPU: einsum), and with the kernel forced, XLA refused to partition it
("Mosaic kernels cannot be automatically partitioned") because nothing traced the trainer's
programs with its mesh in context.

Needs the `compile` extra (libtpu, jax's CUDA plugin); compiling takes ~2 minutes on 2 cores.
"""

import importlib.util

import jax
import pytest

from cfpo_jax import config as config_lib
from cfpo_jax.models import ModelConfig

LAYERS, D, F, V, HEADS, KV_HEADS, HEAD_DIM = 2, 512, 1024, 1024, 4, 2, 128
PROMPT, NEW, PROMPTS, GROUP, SLOTS = 64, 64, 4, 2, 8


def _config():
    c = config_lib.base_config()
    c.model.path = "tiny"  # the shapes come from `model` below; nothing is loaded
    c.data.batch_size, c.rl.group_size = PROMPTS, GROUP
    c.rl.num_epochs = 2  # off policy: prepare runs the old-logprob pass
    c.sampling.max_prompt_len, c.sampling.max_new_tokens = PROMPT, NEW
    c.sampling.max_concurrent = SLOTS
    c.model.dtype = "bfloat16"
    config_lib.validate(c)
    model = ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=D, intermediate_size=F,
                        num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                        param_dtype="float32", dtype="bfloat16")
    return c, model


def _num_params():
    attn = D * HEADS * HEAD_DIM * 2 + D * KV_HEADS * HEAD_DIM * 2 + (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return 2 * V * D + LAYERS * (attn + 3 * D * F + 2 * D) + D


def _peak_bound(program: str, chips: int, shards: int) -> float:
    """Bytes one chip may need, from the shapes: generous, but far below what a replicated state,
    unsharded rows or [T, T] float32 scores for every head and layer at once would take."""
    params = _num_params()
    L = PROMPT + NEW
    if program in ("update", "prepare"):
        rows = PROMPTS * GROUP // shards
        # f32 params + 2 Adam moments sharded over the chips, twice (in and out), one full f32
        # copy (gathered weights or gradients), and per row and token the layers' activations
        # (f32, 8·D + 4·F per layer) and the float32 logits.
        state = (12 if program == "update" else 4) * params / chips
        return 2 * state + 4 * params + 4 * rows * L * (LAYERS * (8 * D + 4 * F) + 4 * V)
    # Sampler: bf16 weights (whole on every chip) and room for one temporary copy of them (XLA
    # keeps a transposed unembedding), the slots' bf16 KV cache twice, the outputs, and per prompt
    # row and token the f32 activations and logits.
    cache = 2 * LAYERS * SLOTS * KV_HEADS * 256 * HEAD_DIM * 2 / shards
    outputs = PROMPTS * GROUP * NEW * 8
    rows = (PROMPTS if program == "prefill" else SLOTS) // shards
    tokens = PROMPT if program == "prefill" else 1
    return 4 * params + 2 * cache + outputs + 4 * rows * tokens * (LAYERS * (8 * D + 4 * F) + 4 * V)


TARGETS = {"v5e-4": ("libtpu", dict(update=["tpu_custom_call"], prepare=["tpu_custom_call"],
                                     prefill=["tpu_custom_call"], decode=["tpu_custom_call"])),
           "h100x2": ("jax_cuda12_plugin", dict(update=["__cudnn$fmhaScaleBiasSoftmax",
                                                        "__cudnn$fmhaScaleBiasSoftmaxBackward"],
                                                prepare=["__cudnn$fmhaScaleBiasSoftmax"],
                                                prefill=["__cudnn$fmhaScaleBiasSoftmax"],
                                                decode=["__gpu$xla.gpu.triton"]))}


@pytest.fixture(scope="module", params=list(TARGETS))
def compiled(request):
    """(target, mesh, {program: report row}) for every program of the small config."""
    name = request.param
    package = TARGETS[name][0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[compile]')")
    from cfpo_jax import sharding
    from cfpo_jax.aot import programs, report, targets

    config, model = _config()
    mesh = sharding.make_mesh(1, -1, 1, devices=list(targets.devices(name)))
    built = {**programs.learner_programs(config, model, mesh), **programs.sampler_programs(config, model, mesh)}
    # The run's matmul precision, not the "highest" tests/conftest.py sets for CPU numerics (with
    # it Mosaic rejects splash's bf16 dots: "Bad lhs type").
    with jax.default_matmul_precision("default"):
        return name, mesh, {program: report.compile_program(p, mesh) for program, p in built.items()}


@pytest.mark.parametrize("program", ["update", "prepare", "prefill", "decode"])
def test_compiles_with_the_fused_kernel_and_fits(compiled, program):
    name, mesh, rows = compiled
    row = rows[program]
    assert row["compiled"], f"{name} {program}: {row['error']}"
    missing = set(TARGETS[name][1][program]) - set(row["kernels"])
    assert not missing, f"{name} {program}: no {sorted(missing)} in the compiled HLO (found {row['kernels']})"
    chips, shards = mesh.size, mesh.shape["data"] * mesh.shape["fsdp"]
    assert mesh.shape["fsdp"] == chips
    bound = _peak_bound(program, chips, shards)
    assert 0 < row["peak"] < bound, f"{name} {program}: peak {row['peak']:,} B per chip > bound {bound:,.0f} B"


def test_auto_follows_the_mesh_in_context_not_the_host():
    """The kernel "auto" picks and interpret mode follow the mesh's platform: on this CPU host a
    TPU mesh gets splash/paged, an H100 mesh cuDNN/Pallas, no mesh the host's einsum."""
    for package in ("libtpu", "jax_cuda12_plugin"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install -e '.[compile]')")
    import jax.numpy as jnp

    from cfpo_jax import sharding
    from cfpo_jax.aot import targets
    from cfpo_jax.models import attention

    chosen = {}
    for name in ("v5e-4", "h100x2"):
        mesh = sharding.make_mesh(1, -1, 1, devices=list(targets.devices(name)))
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            chosen[name] = (attention.target_platform(), attention.resolve("auto", jnp.bfloat16, 128),
                            attention.resolve_decode("auto", jnp.bfloat16, 128))
    assert chosen == {"v5e-4": ("tpu", "splash", "paged"), "h100x2": ("gpu", "cudnn", "pallas")}
    assert (attention.target_platform(), attention.resolve("auto", jnp.bfloat16, 128)) == ("cpu", "einsum")


@pytest.mark.parametrize("name", list(TARGETS))
def test_hlo_flops_count_every_trip_of_a_loop(name):
    """A 6-step scan of [256, 512] @ [512, 512] matmuls: 6 · 2 · 256 · 512 · 512 FLOPs, counted
    from the compiled HLO (XLA's own cost analysis on TPU counts the loop body once)."""
    if importlib.util.find_spec(TARGETS[name][0]) is None:
        pytest.skip(f"{TARGETS[name][0]} is not installed (pip install -e '.[compile]')")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from cfpo_jax.aot import report, targets

    mesh = Mesh(np.array(targets.devices(name)[:1]), ("x",))
    abstract = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    layers = lambda x, w_LxDxD: jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w_LxDxD)[0]
    compiled = jax.jit(layers).lower(abstract((256, 512)), abstract((6, 512, 512))).compile()
    assert report.hlo_dot_flops(compiled.as_text()) == 6 * 2 * 256 * 512 * 512


@pytest.mark.parametrize("name", list(TARGETS))
def test_hlo_flops_of_a_dot_written_as_a_padded_window(name):
    """x[64, 512] @ w[512, 28, 128] (a q projection: heads out of the kernel) is 2 · 64 · 512 · 28 ·
    128 FLOPs. The TPU compiler writes it as a convolution whose 28-wide window slides over a
    size-1 input padded by 27 on each side (each output meets one input element, not 28): counted
    per window it was 28 × too many, the TPU FLOPs ratios of benchmarks/README.md before this test."""
    if importlib.util.find_spec(TARGETS[name][0]) is None:
        pytest.skip(f"{TARGETS[name][0]} is not installed (pip install -e '.[compile]')")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from cfpo_jax.aot import report, targets

    mesh = Mesh(np.array(targets.devices(name)[:1]), ("x",))
    abstract = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    project = lambda x_BxD, w_DxNxH: jnp.einsum("bd,dnh->bnh", x_BxD, w_DxNxH)
    compiled = jax.jit(project).lower(abstract((64, 512)), abstract((512, 28, 128))).compile()
    assert report.hlo_dot_flops(compiled.as_text()) == 2 * 64 * 512 * 28 * 128


# One decode-like loop as XLA prints it: per trip a fusion reads a [64, 256] slice of a [64, 512,
# 256] bf16 cache and w [256, 256] bf16, another writes one [64, 1, 256] column of the cache in
# place (a dynamic-update-slice at the fusion's root), an async slice moves a quarter of v
# [1024, 256] into on-chip memory (S(1)), and a fusion reads that on-chip copy.
_LOOP_HLO = """HloModule steps

%read_slice (p0: bf16[64,512,256], p1: bf16[256,256], p2: s32[]) -> bf16[64,256] {
  %p0 = bf16[64,512,256]{2,1,0} parameter(0)
  %p1 = bf16[256,256]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %ds = bf16[64,1,256]{2,1,0} dynamic-slice(%p0, %z, %p2, %z), dynamic_slice_sizes={64,1,256}
  %r = bf16[64,256]{1,0} bitcast(%ds)
  ROOT %dot = bf16[64,256]{1,0} dot(%r, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%write_column (q0: bf16[64,512,256], q1: bf16[64,256], q2: s32[]) -> bf16[64,512,256] {
  %q0 = bf16[64,512,256]{2,1,0} parameter(0)
  %q1 = bf16[64,256]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  %col = bf16[64,1,256]{2,1,0} bitcast(%q1)
  ROOT %dus = bf16[64,512,256]{2,1,0} dynamic-update-slice(%q0, %col, %zero, %q2, %zero)
}

%use_onchip (u0: bf16[256,256], u1: bf16[64,256]) -> bf16[64,256] {
  %u0 = bf16[256,256]{1,0:S(1)} parameter(0)
  %u1 = bf16[64,256]{1,0} parameter(1)
  ROOT %d = bf16[64,256]{1,0} dot(%u1, %u0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (arg: (s32[], bf16[64,512,256], bf16[256,256], bf16[1024,256])) -> (s32[], bf16[64,512,256], bf16[256,256], bf16[1024,256]) {
  %arg = (s32[], bf16[64,512,256]{2,1,0}, bf16[256,256]{1,0}, bf16[1024,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %cache = bf16[64,512,256]{2,1,0} get-tuple-element(%arg), index=1
  %w = bf16[256,256]{1,0} get-tuple-element(%arg), index=2
  %v = bf16[1024,256]{1,0} get-tuple-element(%arg), index=3
  %x = bf16[64,256]{1,0} fusion(%cache, %w, %i), kind=kOutput, calls=%read_slice
  %new = bf16[64,512,256]{2,1,0} fusion(%cache, %x, %i), kind=kLoop, calls=%write_column
  %ss = ((bf16[1024,256]{1,0}), bf16[256,256]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%v), slice={[0:256], [0:256]}
  %sd = bf16[256,256]{1,0:S(1)} slice-done(%ss)
  %y = bf16[64,256]{1,0} fusion(%sd, %x), kind=kOutput, calls=%use_onchip
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], bf16[64,512,256]{2,1,0}, bf16[256,256]{1,0}, bf16[1024,256]{1,0}) tuple(%next, %new, %w, %v)
}

%cond (c: (s32[], bf16[64,512,256], bf16[256,256], bf16[1024,256])) -> pred[] {
  %c = (s32[], bf16[64,512,256]{2,1,0}, bf16[256,256]{1,0}, bf16[1024,256]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %limit = s32[] constant(512)
  ROOT %lt = pred[] compare(%ci, %limit), direction=LT
}

ENTRY %main (a: bf16[64,512,256], b: bf16[256,256], c: bf16[1024,256]) -> bf16[64,512,256] {
  %a = bf16[64,512,256]{2,1,0} parameter(0)
  %b = bf16[256,256]{1,0} parameter(1)
  %c = bf16[1024,256]{1,0} parameter(2)
  %start = s32[] constant(0)
  %init = (s32[], bf16[64,512,256]{2,1,0}, bf16[256,256]{1,0}, bf16[1024,256]{1,0}) tuple(%start, %a, %b, %c)
  %loop = (s32[], bf16[64,512,256]{2,1,0}, bf16[256,256]{1,0}, bf16[1024,256]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %result = bf16[64,512,256]{2,1,0} get-tuple-element(%loop), index=1
}
"""


def test_loop_traffic_charges_what_a_trip_touches_in_hbm():
    """`report.loop_traffic` of one trip (`_LOOP_HLO`): the slice fusion reads a [64, 256] slice of
    the cache (32,768 bytes, not the 16.8 MB buffer) and w (131,072) and writes x (32,768); the
    in-place column write reads and writes its update (32,768 each) plus x; the async slice reads
    a quarter of v from HBM (131,072) and writes on chip (0); the fusion over the on-chip copy
    reads only x from HBM."""
    from cfpo_jax.aot import report

    body, rows = report.loop_traffic(_LOOP_HLO)
    assert body == "body"
    traffic = {inst: ([b for _, b in reads], written) for inst, _, reads, written in rows}
    col = 64 * 256 * 2
    assert traffic["x"] == ([col, 256 * 256 * 2, 4], col)
    assert traffic["new"] == ([col, col, 4], col)
    assert traffic["ss"] == ([256 * 256 * 2], 0)
    assert traffic["y"] == ([0, col], col)
    assert set(traffic) == {"x", "new", "ss", "y", "next"}
    assert report.hlo_dot_flops(_LOOP_HLO, body) == 2 * 2 * 64 * 256 * 256


# The H100 only: at this model's size XLA:TPU keeps part of the weights in on-chip memory across
# decode steps (fewer HBM bytes than the formula), and the count found no HBM read of its small
# cache (not investigated); the real configs' TPU rows are in benchmarks/README.md (decode_bytes.py).
@pytest.mark.parametrize("name", ["h100x2"])
def test_decode_step_reads_each_weight_once_and_writes_one_cache_column(name):
    """benchmarks/decode_bytes.py on the small model's decode chunk: one step reads every bf16
    weight once from HBM — of the untied embedding table only the fed rows: 2 · (params − V·D) +
    slots·D·2 bytes per chip, the weights whole on each — charges the attention
    kernel the allocated cache (its static shapes), writes only one column per slot, layer, key
    and value in place (read and written: 2 · 2 · layers · slots · kv heads · head_dim · 2 bytes),
    and its matmuls are 2 · (matmul params: no biases, norms or embedding lookup) FLOPs per slot."""
    if importlib.util.find_spec(TARGETS[name][0]) is None:
        pytest.skip(f"{TARGETS[name][0]} is not installed (pip install -e '.[compile]')")
    import os
    import sys

    from cfpo_jax import sharding
    from cfpo_jax.aot import programs, targets

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks"))
    import decode_bytes

    config, model = _config()
    mesh = sharding.make_mesh(1, -1, 1, devices=list(targets.devices(name)))
    decode = programs.sampler_programs(config, model, mesh)["decode"]
    with jax.default_matmul_precision("default"), programs.mesh_context(mesh):
        hlo = decode.jitted.lower(*decode.args).compile().as_text()
    r = decode_bytes.analyse(hlo, decode_bytes.facts(config, model, decode))
    slots = SLOTS // mesh.shape["fsdp"]
    assert not model.qkv_bias  # (_num_params counts biases: a bound elsewhere)
    norms = LAYERS * 2 * D + D
    matmul = LAYERS * (2 * D * HEADS * HEAD_DIM + 2 * D * KV_HEADS * HEAD_DIM + 3 * D * F) + V * D  # + the head
    assert r["weights_ideal"] == 2 * (matmul + norms) + slots * D * 2
    assert r["compiled"]["weights"] == r["weights_ideal"]
    columns = r["columns"]  # the prompt bucket - 1 + new tokens, rounded up to the kernel's 128
    assert r["compiled"]["kv"] == r["kv_full"] == 2 * LAYERS * slots * KV_HEADS * columns * HEAD_DIM * 2
    assert 0 < r["compiled"]["kv_write"] <= 2 * 2 * LAYERS * slots * KV_HEADS * HEAD_DIM * 2
    assert r["flops"] == r["model_flops"] == 2 * matmul * slots


def test_hlo_flops_of_a_windowed_matmul():
    """x[rows, 3584] @ w[3584, 18944] with rows and w's first axis split over a v5e-8's 8 chips (an
    FSDP layer): 2 · rows/chip · 3584 · 18944 FLOPs per chip. The TPU compiler gathers w in a
    windowed loop (collective matmul; on 4 chips it unrolls it) whose unsigned counter steps by 2
    up to 4: 2 trips. Counted by its bound it was 2 ×; with signed bounds only, 1 trip, ½ — the
    7B TPU rows of benchmarks/README.md before this test."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[compile]')")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from cfpo_jax.aot import report, targets

    devices = targets.devices("v5e-8")
    mesh = Mesh(np.array(devices), ("fsdp",))
    rows, d, f = 2560 * len(devices), 3584, 18944
    split = NamedSharding(mesh, P("fsdp", None))
    layer = jax.jit(lambda x_BxD, w_DxF: x_BxD @ w_DxF, out_shardings=split)
    hlo = layer.lower(jax.ShapeDtypeStruct((rows, d), jnp.bfloat16, sharding=split),
                      jax.ShapeDtypeStruct((d, f), jnp.bfloat16, sharding=split)).compile().as_text()
    assert "windowed_dot_general" in hlo  # else the compiler changed and this tests nothing
    assert report.hlo_dot_flops(hlo) == 2 * (rows // len(devices)) * d * f
    # Its gradient: forward, dx and dw, three such matmuls; dw is reduce-scattered in a windowed loop.
    loss = lambda w_DxF, x_BxD: jnp.sum(jnp.tanh(x_BxD @ w_DxF).astype(jnp.float32))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), out_shardings=(split, split))
    hlo = grads.lower(jax.ShapeDtypeStruct((d, f), jnp.bfloat16, sharding=split),
                      jax.ShapeDtypeStruct((rows, d), jnp.bfloat16, sharding=split)).compile().as_text()
    assert "windowed_dot_general_body_rs" in hlo
    assert report.hlo_dot_flops(hlo) == 3 * 2 * (rows // len(devices)) * d * f


def test_tpu_decode_step_writes_the_cache_in_place():
    """The decode chunk compiled for the v5e slice copies no layer's KV cache: no `copy` in its HLO
    has a cache layer's per-chip shape. Before 68c11c6 the step wrote a [kv_heads, head_dim] window
    per slot, the TPU compiler gave the loop's cache a kv-heads-minor layout and copied every
    layer's cache into the paged kernel's layout at every step (3.4 GB of temporaries for
    math_qwen:1.5b-v5e); in this small model the copies sit in memory space 1, where the peak
    bound of test_compiles_with_the_fused_kernel_and_fits cannot see them."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[compile]')")
    import re

    from cfpo_jax import sharding
    from cfpo_jax.aot import programs, targets

    config, model = _config()
    mesh = sharding.make_mesh(1, -1, 1, devices=list(targets.devices("v5e-4")))
    decode = programs.sampler_programs(config, model, mesh)["decode"]
    slots = decode.args[2]
    layer_shapes = {",".join(map(str, leaf.sharding.shard_shape(leaf.shape)))
                    for leaf in jax.tree.leaves(slots) if leaf.ndim == 4}
    assert len(layer_shapes) == 1, layer_shapes  # [slots, kv heads, columns, head_dim] per chip
    with jax.default_matmul_precision("default"), programs.mesh_context(mesh):
        hlo = decode.jitted.lower(*decode.args).compile().as_text()
    copy = re.compile(r"=\s*bf16\[(" + "|".join(layer_shapes) + r")\]\S*\s+copy(-start)?\(")
    copies = [line.strip()[:160] for line in hlo.splitlines() if copy.search(line)]
    assert not copies, f"{len(copies)} copies of a cache layer per decode step, e.g. {copies[0]}"


# A small Qwen3-MoE: 8 experts of width 256, 2 per token, split over an 'expert' axis of 2.
EXPERTS, TOP_K, MOE_F = 8, 2, 256


def _moe_model(moe_matmul="ragged_dot"):
    return ModelConfig(model_type="qwen3_moe", vocab_size=V, hidden_size=D, intermediate_size=F,
                       num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       qk_norm=True, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                       moe_intermediate_size=MOE_F, norm_topk_prob=True, param_dtype="float32",
                       dtype="bfloat16", moe_matmul=moe_matmul)


def _moe_peak_bound(program: str, chips: int, shards: int) -> float:
    """`_peak_bound` with the MoE layer's parameters (router and experts, whole) in place of the
    dense MLP's, and per token the k experts' activations (the dispatch copies x k times)."""
    attn = D * HEADS * HEAD_DIM * 2 + D * KV_HEADS * HEAD_DIM * 2
    params = 2 * V * D + LAYERS * (attn + D * EXPERTS + 3 * EXPERTS * D * MOE_F + 2 * D) + D
    L = PROMPT + NEW
    act = LAYERS * (8 * D + TOP_K * (2 * D + 4 * MOE_F)) + 4 * V
    if program in ("update", "prepare"):
        rows = PROMPTS * GROUP // shards
        state = (12 if program == "update" else 4) * params / chips
        return 2 * state + 4 * params + 4 * rows * L * act * TOP_K
    cache = 2 * LAYERS * SLOTS * KV_HEADS * 256 * HEAD_DIM * 2 / shards
    rows = (PROMPTS if program == "prefill" else SLOTS) // shards
    tokens = PROMPT if program == "prefill" else 1
    return 4 * params + 2 * cache + PROMPTS * GROUP * NEW * 8 + 4 * rows * tokens * act * TOP_K


@pytest.mark.parametrize("name", list(TARGETS))
def test_moe_compiles_with_expert_parallelism_and_fits(name):
    """The MoE model's update and decode step, with routing replay (the update reads the
    sampler's routing, the decode step records it), compile for the chips with experts split over
    'expert' = 2 (fsdp over the rest), keep the platform's fused attention kernel and fit a bound
    from the shapes."""
    package = TARGETS[name][0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[compile]')")
    from cfpo_jax import sharding
    from cfpo_jax.aot import programs, report, targets

    config, _ = _config()
    config.model.tiny.num_experts = EXPERTS
    config.model.moe_routing = "replay"  # the rollout carries the routing; decode records it
    mesh = sharding.make_mesh(1, -1, 1, devices=list(targets.devices(name)), expert=2)
    model = _moe_model()
    # The update (forward + backward) and the decode step: prepare and prefill run the same layers
    # as the update's forward and as the decode step, and compiling them too doubled the time.
    built = {"update": programs.learner_programs(config, model, mesh)["update"],
             "decode": programs.sampler_programs(config, model, mesh)["decode"]}
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    with jax.default_matmul_precision("default"):
        for program, p in built.items():
            row = report.compile_program(p, mesh)
            assert row["compiled"], f"{name} {program}: {row['error']}"
            missing = set(TARGETS[name][1][program]) - set(row["kernels"])
            assert not missing, f"{name} {program}: no {sorted(missing)} in the compiled HLO"
            bound = _moe_peak_bound(program, mesh.size, shards)
            assert 0 < row["peak"] < bound, f"{name} {program}: peak {row['peak']:,} B > bound {bound:,.0f} B"


# Cloud's figures per pod target: chips, hosts (4 chips per v5p / v6e pod host, 8 GPUs per H100
# host), slices, device kind.
H100 = "NVIDIA H100 80GB HBM3"
PODS = {"v5p-16": (8, 2, 1, "TPU v5"), "v5p-32": (16, 4, 1, "TPU v5"), "v5p-64": (32, 8, 1, "TPU v5"),
        "v5p-128": (64, 16, 1, "TPU v5"), "v5p-256": (128, 32, 1, "TPU v5"),
        "v5p-64x2": (64, 16, 2, "TPU v5"), "v6e-64": (64, 16, 1, "TPU v6 lite"),
        "v6e-256": (256, 64, 1, "TPU v6 lite"),
        "h100x16": (16, 2, 1, H100), "h100x32": (32, 4, 1, H100), "h100x64": (64, 8, 1, H100)}


@pytest.mark.parametrize("name", list(PODS))
def test_pod_target_spans_its_hosts_and_a_data_parallel_step_compiles(name):
    """Each pod's compile-only devices: its chips over its hosts (and slices), and a data-parallel
    gradient step (batch over data × fsdp, weights over fsdp) compiled for all of them — with
    `mesh.dcn` = the slices, the data axis across the two v5p-64 slices — holding the all-reduce
    or reduce-scatter that crosses the hosts."""
    from cfpo_jax.aot import targets

    target = targets.get(name)
    if importlib.util.find_spec("libtpu" if target.platform == "tpu" else "jax_cuda12_plugin") is None:
        pytest.skip("no compile-only devices for it (pip install -e '.[compile]')")
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cfpo_jax import sharding

    chips, hosts, slices, kind = PODS[name]
    devices = targets.devices(name)
    assert (len(devices), len({d.process_index for d in devices}), devices[0].device_kind) == (chips, hosts, kind)
    assert (target.chips, target.hosts, target.slices) == (chips, hosts, slices)
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=devices, dcn=slices)
    assert dict(mesh.shape) == {"data": slices, "fsdp": chips // slices, "expert": 1, "tensor": 1}
    x = jax.ShapeDtypeStruct((8 * chips, 256), jnp.bfloat16, sharding=sharding.batch_sharding(mesh))
    w = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))),
                   out_shardings=NamedSharding(mesh, P("fsdp", None)))
    hlo = grad.lower(w, x).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo
