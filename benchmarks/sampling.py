"""Sampler throughput: cfpo_jax.sampling.generate against transformers' generate and the roofline,
continuous batching against static batches on long-tailed lengths, peak memory against rows, and
sampling from a LoRA-adapted model with the adapters on the fly against merged once per call.

    python benchmarks/sampling.py                  # GPU: Qwen2.5-0.5B and 1.5B shapes, batch 64, 256
    python benchmarks/sampling.py --small          # CPU smoke run at a tiny size (seconds)
    python benchmarks/sampling.py --shapes 0.5b --batches 256 --no-hf --profile   # top GPU kernels
    python benchmarks/sampling.py --long-tail      # GPU: 1,024 rows, log-normal lengths, K = 256
    python benchmarks/sampling.py --memory         # GPU: peak memory at 256, 1,024, 4,096 rows, K = 256
    python benchmarks/sampling.py --shapes 7b --batches 640 --prompt-len 1024 --new-tokens 1024 \
        --max-concurrent 256 --no-hf --repeats 1   # math_qwen:7b's per-GPU share on one 80 GB GPU
    python benchmarks/sampling.py --small --long-tail   # CPU versions (tiny shapes)
    python benchmarks/sampling.py --small --memory --new-tokens 128
    python benchmarks/sampling.py --shapes 0.5b --lora-rank 64   # GPU: LoRA on the fly vs merged (issue 15)
    python benchmarks/sampling.py --small --lora-rank 8 --repeats 10   # its CPU version

Random bf16 weights, every prompt `--prompt-len` tokens, `--new-tokens` tokens drawn with
temperature 1 and no EOS, so every row runs the full budget. For each shape and batch it prints:

* tokens/s of `generate` (new tokens over the wall time of a whole call: prefill + decode), the
  median of `--repeats` calls after a compile call;
* the same for transformers' `generate` (PyTorch, bf16, do_sample, top_k 0, its default dynamic cache);
* roofline: a decode step must read every weight once plus the keys/values of the valid cache
  slots (prompt + tokens so far); their sum over all steps, divided by the copy bandwidth measured
  on this card (a large device copy, bytes read + written), is the fastest the decode could run.
  `roof` is that time over our measured decode time (call time minus a 1-token call's time),
  both over steps 1 .. N-1; `roof (spec)` is the same with the chip's published HBM bandwidth
  (benchmarks/chips.py; "-" for a chip not in that table). Results and the profile's reading:
  benchmarks/README.md.

`--long-tail`: R rows whose completion lengths are drawn from a log-normal (median
`--median-len`, sigma 1, capped at `--new-tokens`), each forced to end at its drawn length (a
per-prompt `max_new_tokens` budget), with K = `--max-concurrent` slots. The continuous-batching
engine runs all R rows through the K slots in one call; the static sampler, with the same K slots
of cache, runs R / K calls of K rows, each until its longest row ends (what `generate` did
before continuous batching). Useful tokens/s = the sum of the drawn lengths over the wall time.

`--memory`: one subprocess per row count (so peaks do not mix) runs a `generate` call at fixed K
and reports its peak memory (GPU: the device's peak_bytes_in_use; CPU: the process's VmHWM),
next to one call with K = the largest row count (every row at once: the static sampler).

`--lora-rank R`: the model (bf16 base) gets adapters of rank R, alpha R, on q k v o gate up down
as configs/gsm8k_qwen_lora.py, every A and B drawn from N(0, 0.02²) (B non-zero, as after
training). Per shape and batch, tokens/s of a whole call three ways, each timed as above: on the
base model (adapters off, `lora.base`); on the adapted model as is (adapters applied on the fly:
two thin matmuls per projection per step); and `lora.merge` then a call on the merged model, the
merge inside each timed call (`config.lora.merge_for_sampling`: the trainer merges once per
rollout). Also the merge's own time (median of `--repeats`) and the bytes of the merged kernels
it makes (one per adapted projection, base dtype), alive for the call — what merging costs in
memory; the on-the-fly path carries the adapters in the compute dtype instead, R·(in + out)
numbers per projection against the merged kernel's in·out. Before timing, a float32 copy at full
matmul precision checks that the merged model is the adapted policy and that the adapters change
it (teacher-forced log-probabilities of two random sequences; the run stops if not). Both paths
do the same work: every row decodes its whole budget. tests/test_lora.py checks the equality of
the two against independent references (numpy-merged kernels, the trainer's log-probabilities).

Run the PyTorch baseline first and release its memory, because JAX preallocates most of the card.
`--json PATH` writes what the table shows as JSON (for benchmarks/accelerator.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time

# JAX takes 75% of the card at its first allocation by default; torch runs first and lets go, so
# JAX can have most of it, but leave the rest for the CUDA context of both libraries.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")

import numpy as np  # noqa: E402

# Run as a script from a checkout: the package is the directory above this file.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chips  # noqa: E402
import shapes  # noqa: E402

SHAPES = {
    **shapes.SHAPES,
    # CPU memory runs: tiny weights, a large per-row cache (8 kv heads x 128 dims).
    "tiny-kv": dict(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=8,
                    num_kv_heads=8, head_dim=128, vocab_size=512, tie_embeddings=True),
}


@dataclasses.dataclass
class Row:
    shape: str
    batch: int
    jax_s: float
    jax_prefill_s: float
    hf_s: float | None
    decode_bytes: float  # bytes the decode steps 1 .. N-1 must read (`decode_bytes`)
    new_tokens: int

    @property
    def tokens(self):
        return self.batch * self.new_tokens

    @property
    def decode_s(self):
        """The decode steps 1 .. N-1: the call's time minus a 1-token call's (prefill and step 0)."""
        return self.jax_s - self.jax_prefill_s


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path, figures):
    """Writes `figures` to `path` as JSON (no-op without a path): what a table printed, for a driver."""
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


def copy_bandwidth(small: bool) -> float:
    """Bytes read + written per second by a large elementwise device copy (jnp), median of 10."""
    import jax
    import jax.numpy as jnp

    size = (1 << 20) if small else (1 << 31)  # 2 GiB of bf16 on the GPU
    x = jnp.ones((size // 2,), jnp.bfloat16)
    # `+ 1` so XLA cannot alias the output to the input; one read and one write of every byte.
    copy = jax.jit(lambda a: a + 1)
    copy(x).block_until_ready()
    seconds = _time(lambda: copy(x).block_until_ready(), 10)
    return 2 * size / seconds


def model_config(shape: str):
    from cfpo_jax.models import ModelConfig

    return ModelConfig(model_type="qwen2", qkv_bias=True, rope_theta=1e6,
                       max_position_embeddings=32768, param_dtype="bfloat16", dtype="bfloat16",
                       **SHAPES[shape])


def decode_bytes(config, num_params, batch, prompt_len, steps):
    """Sum over decode steps of all weight bytes + valid cache bytes (bf16): the roofline's reads."""
    weight_bytes = 2 * num_params
    kv_bytes_per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # k and v
    # Step s attends over the prompt and the s tokens before it: prompt_len + s slots per row.
    slots = sum(prompt_len + s for s in steps)
    return len(steps) * weight_bytes + batch * slots * kv_bytes_per_slot


def print_kernel_profile(run, steps, top=20):
    """Traces `run()` (a generate call of `steps` new tokens) and prints the GPU kernels that took
    the most time, per decode step (the prefill's kernels are spread over the steps too)."""
    import collections
    import glob
    import tempfile

    import jax

    directory = tempfile.mkdtemp(prefix="sampling-profile-")
    jax.profiler.start_trace(directory)
    run()
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0])
    total_ns, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if "GPU" not in plane.name:
            continue
        for line in plane.lines:
            if "Stream" in line.name:
                for event in line.events:
                    total_ns[event.name] += event.duration_ns
                    count[event.name] += 1
    if not total_ns:
        print("  (no GPU kernels in the trace)")
        return
    print(f"  kernel time {sum(total_ns.values()) / 1e6 / steps:.3f} ms/step (summed over streams), "
          f"{sum(count.values()) / steps:.0f} kernels/step")
    for name, ns in total_ns.most_common(top):
        print(f"  {ns / 1e6 / steps:8.3f} ms/step {count[name] / steps:6.1f}x  {name[:80]}")


def time_generate(model, prompts, new_tokens, repeats, *, prepare=None, max_concurrent=None, attention="auto",
                  profile=False):
    """Median wall time (s) of `repeats` generate calls of `new_tokens` tokens per row, after a
    compile call. With `prepare`, each call samples from `prepare(model)` and its time counts in the
    call's (`lora.merge`: once per call, as the trainer merges once per rollout). `profile`: print
    the top GPU kernels of one more call."""
    from cfpo_jax.sampling import generate

    def run(seed):
        policy = model if prepare is None else prepare(model)
        samples = generate(policy, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=seed,
                           max_concurrent=max_concurrent, attention=attention)
        samples.tokens.block_until_ready()
        assert int(samples.lengths.min()) == new_tokens

    run(0)
    seconds = _time(lambda: run(1), repeats)
    if profile:
        print_kernel_profile(lambda: run(2), new_tokens)
    return seconds


def random_prompts(config, batch, prompt_len):
    return np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len)).tolist()


def time_transformers(shape, batch, prompt_len, new_tokens, device):
    import torch
    import transformers

    spec = SHAPES[shape]
    hf_config = transformers.Qwen2Config(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
        tie_word_embeddings=spec["tie_embeddings"], rope_theta=1e6, max_position_embeddings=32768,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16).eval()
    ids = torch.randint(0, spec["vocab_size"], (batch, prompt_len), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                  top_p=1.0, pad_token_id=0, eos_token_id=None)

    def run(num_new):
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=num_new, min_new_tokens=num_new, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (batch, prompt_len + num_new)

    run(4)
    seconds = _time(lambda: run(new_tokens), 1)
    del model, ids
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def long_tail(config, rows, prompt_len, cap, median, max_concurrent, repeats):
    """Useful tokens/s of one continuous-batching call against static batches of K rows."""
    import jax
    from flax import nnx

    from cfpo_jax.models import Transformer
    from cfpo_jax.sampling import generate

    model = Transformer(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = np.minimum(np.maximum(np.round(rng.lognormal(np.log(median), 1.0, rows)), 1), cap).astype(int)
    prompts = rng.integers(0, config.vocab_size, (rows, prompt_len)).tolist()

    def engine():
        s = generate(model, prompts, max_new_tokens=lengths.tolist(), max_concurrent=max_concurrent, seed=1)
        jax.block_until_ready(s.tokens)
        assert np.array_equal(np.asarray(s.lengths), lengths)

    def static():
        for start in range(0, rows, max_concurrent):
            part = slice(start, start + max_concurrent)
            # One call per K rows, all in flight at once: each runs until its longest row ends.
            s = generate(model, prompts[part], max_new_tokens=lengths[part].tolist(),
                         max_concurrent=max_concurrent, seed=1)
            jax.block_until_ready(s.tokens)

    engine()
    static()  # compile both
    engine_s, static_s = _time(engine, repeats), _time(static, repeats)
    useful = int(lengths.sum())
    static_steps = sum(int(lengths[i:i + max_concurrent].max()) for i in range(0, rows, max_concurrent))
    print(f"\nlong-tailed lengths: {rows} rows, log-normal median {median} (sigma 1) capped at {cap}: "
          f"mean {lengths.mean():.0f}, max {lengths.max()}; prompt {prompt_len}; K = {max_concurrent} slots")
    print(f"{'sampler':>22} {'wall s':>8} {'useful tok/s':>13} {'decode steps':>13}")
    print(f"{'continuous batching':>22} {engine_s:>8.2f} {useful / engine_s:>13,.0f} {'>= ' + str(-(-useful // max_concurrent)):>13}")
    print(f"{'static batches of K':>22} {static_s:>8.2f} {useful / static_s:>13,.0f} {static_steps:>13}")
    print(f"speed-up: {static_s / engine_s:.2f}x")
    return dict(sequences=rows, prompt_len=prompt_len, median=median, cap=cap, max_concurrent=max_concurrent,
                mean_len=float(lengths.mean()), useful_tokens=useful, engine_s=engine_s, static_s=static_s,
                engine_tokens_per_s=useful / engine_s, static_tokens_per_s=useful / static_s,
                static_decode_steps=static_steps, speedup=static_s / engine_s)


@dataclasses.dataclass
class LoraRow:
    shape: str
    batch: int
    new_tokens: int
    base_s: float  # a generate call on the base model
    on_the_fly_s: float  # on the adapted model as is (adapter matmuls in every step)
    merged_s: float  # lora.merge, then a generate call on the merged model
    merge_s: float  # lora.merge alone
    merged_bytes: int  # the kernels lora.merge makes, alive for the call

    @property
    def tokens(self):
        return self.batch * self.new_tokens


def adapted_model(config, rank):
    """A model of `config` with adapters of `rank` (alpha = rank: a scale of 1) on q k v o gate up
    down, as configs/gsm8k_qwen_lora.py, every A and B drawn from N(0, 0.02²) like the base
    kernels: `lora.adapt`'s B is zero, and a trained adapter's is not."""
    import jax
    from flax import nnx

    from cfpo_jax import lora
    from cfpo_jax.models import Transformer
    from cfpo_jax.models.config import LORA_TARGETS

    adapted = lora.adapt(Transformer(config, rngs=nnx.Rngs(0)), rank=rank, alpha=rank, targets=LORA_TARGETS)
    graphdef, adapters, frozen = lora.split(adapted)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [0.02 * jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), frozen)


def merged_kernel_bytes(model) -> int:
    """Bytes of the kernels `lora.merge` makes: one per adapted projection, in the base dtype."""
    return sum(getattr(model.blocks.attn if target in ("q", "k", "v", "o") else model.blocks.mlp,
                       f"{target}_kernel")[...].nbytes
               for target in model.config.lora_targets)


def check_merged_policy(config, rank, length):
    """Asserts that `lora.merge` of `adapted_model(config, rank)` is the adapted policy and that
    its adapters move the policy away from the base: teacher-forced log-probabilities
    (`models.sequence_logprobs`) of two random sequences of `length` tokens, in float32 at full
    matmul precision, where merging is exact up to rounding (in bfloat16 the merged kernels'
    rounding would blur the two). Returns the mean |Δ log p| of the merged model and of the base
    against the adapted model on the fly."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cfpo_jax import lora
    from cfpo_jax.models import sequence_logprobs

    adapted = adapted_model(config.replace(param_dtype="float32", dtype="float32"), rank)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, length)))
    score = nnx.jit(lambda model, t: sequence_logprobs(model, t, jnp.ones_like(t))[0][:, 1:])
    with jax.default_matmul_precision("highest"):  # no TF32 for float32 matmuls on a GPU
        on_the_fly = np.asarray(score(adapted, tokens))
        merged_gap, base_gap = (float(np.abs(np.asarray(score(model, tokens)) - on_the_fly).mean())
                                for model in (lora.merge(adapted), lora.base(adapted)))
    assert merged_gap < base_gap / 100, (
        f"mean |Δ log p| against the adapted model: merged {merged_gap:.2e}, base {base_gap:.2e}: the merged "
        "model is not the adapted policy, or the adapters hardly change it")
    return merged_gap, base_gap


def lora_sampling(shape, rank, batches, prompt_len, new_tokens, repeats, max_concurrent, attention):
    """Per batch, `generate` on the base, on the adapted model as is, and on `lora.merge` of it
    made inside each call; the merge's own time and bytes. Checks first (`check_merged_policy`)
    that the merged model is the adapted policy and that the adapters matter."""
    import jax
    from flax import nnx

    from cfpo_jax import lora

    config = model_config(shape)
    merged_gap, base_gap = check_merged_policy(config, rank, prompt_len + new_tokens)
    print(f"{shape}, LoRA rank {rank}, float32: mean |Δ log p| from the adapted model on the fly: "
          f"merged {merged_gap:.1e}, base {base_gap:.1e}", flush=True)
    adapted = adapted_model(config, rank)
    base = lora.base(adapted)

    def merge():
        jax.block_until_ready(nnx.state(lora.merge(adapted)))

    merge()  # compile
    merge_s = _time(merge, repeats)
    rows = []
    for batch in batches:
        prompts = random_prompts(config, batch, prompt_len)
        engine = dict(max_concurrent=max_concurrent, attention=attention)
        base_s = time_generate(base, prompts, new_tokens, repeats, **engine)
        on_the_fly_s = time_generate(adapted, prompts, new_tokens, repeats, **engine)
        merged_s = time_generate(adapted, prompts, new_tokens, repeats, prepare=lora.merge, **engine)
        rows.append(LoraRow(shape, batch, new_tokens, base_s, on_the_fly_s, merged_s, merge_s,
                            merged_kernel_bytes(adapted)))
        print(f"{shape} batch {batch}: base {base_s:.3f} s, on the fly {on_the_fly_s:.3f} s, "
              f"merged {merged_s:.3f} s", flush=True)
    return rows


def print_lora_table(rows, rank, prompt_len, new_tokens):
    print(f"\nLoRA rank {rank} (alpha {rank}) on q k v o gate up down, bf16 base; prompt {prompt_len} "
          f"tokens, {new_tokens} new tokens, temperature 1, no EOS; merged = lora.merge + generate per call")
    header = (f"{'shape':>6} {'batch':>5} {'base tok/s':>11} {'on-the-fly tok/s':>16} {'merged tok/s':>12} "
              f"{'merged/on-the-fly':>17} {'merge ms':>9} {'merged kernels MB':>17}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.shape:>6} {r.batch:>5} {r.tokens / r.base_s:>11,.0f} {r.tokens / r.on_the_fly_s:>16,.0f} "
              f"{r.tokens / r.merged_s:>12,.0f} {r.on_the_fly_s / r.merged_s:>16.2f}x "
              f"{1e3 * r.merge_s:>9.2f} {r.merged_bytes / 1e6:>17,.1f}")


MEMORY_CHILD = """
import os, sys, json
sys.path[:0] = [{root!r}, os.path.join({root!r}, "benchmarks")]  # the package; sampling.py's `import shapes`
import numpy as np, jax
from flax import nnx
from benchmarks.sampling import model_config, random_prompts
from cfpo_jax.models import Transformer
from cfpo_jax.sampling import generate
shape, rows, k, prompt_len, new_tokens = sys.argv[1], *map(int, sys.argv[2:6])
model = Transformer(model_config(shape), rngs=nnx.Rngs(0))
prompts = random_prompts(model.config, rows, prompt_len)
s = generate(model, prompts, max_new_tokens=new_tokens, max_concurrent=k, seed=1)
jax.block_until_ready(s.tokens)
stats = jax.devices()[0].memory_stats() or {{}}
peak = stats.get("peak_bytes_in_use") or next(
    int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(dict(peak=peak, source="device peak_bytes_in_use" if stats else "process VmHWM")))
"""


def memory_against_rows(shape, rows_list, max_concurrent, prompt_len, new_tokens):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = MEMORY_CHILD.format(root=root)
    runs = [(r, max_concurrent) for r in rows_list] + [(rows_list[-1], rows_list[-1])]
    print(f"\npeak memory, {shape} shape, prompt {prompt_len} + {new_tokens} new tokens (no EOS):")
    print(f"{'rows':>6} {'K':>6} {'peak MB':>10}")
    for rows, k in runs:
        run = subprocess.run([sys.executable, "-c", script, shape, str(rows), str(k), str(prompt_len),
                              str(new_tokens)], capture_output=True, text=True)
        if run.returncode:  # e.g. the static reference running out of device memory
            print(f"{rows:>6} {k:>6} {'failed':>10}   ({run.stderr.strip().splitlines()[-1][:100]})", flush=True)
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{rows:>6} {k:>6} {result['peak'] / 1e6:>10,.1f}   ({result['source']})", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny model and sizes, runs on CPU")
    parser.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--batches", default=None, help="comma list of batch sizes")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of one call")
    parser.add_argument("--max-concurrent", type=int, default=None, help="K slots (default: all rows for "
                        "the fixed-length table, 256 (small: 16) for --long-tail and --memory)")
    parser.add_argument("--attention", default="auto", help="decode attention of the fixed-length table "
                        "(auto, einsum, pallas, paged): e.g. a TPU's paged kernel against einsum")
    parser.add_argument("--long-tail", action="store_true", help="continuous vs static batching, long-tailed lengths")
    parser.add_argument("--rows", type=int, default=None, help="rows for --long-tail (1024; small: 128)")
    parser.add_argument("--median-len", type=int, default=None, help="median length for --long-tail (400; small: 24)")
    parser.add_argument("--memory", action="store_true", help="peak memory against rows at a fixed K")
    parser.add_argument("--lora-rank", type=int, default=0, help="sampling from a LoRA-adapted model of this "
                        "rank: adapters on the fly against lora.merge per call, beside the base (0: off)")
    parser.add_argument("--json", help="also write the table's figures to this file (not with --memory)")
    args = parser.parse_args(argv)
    shapes = (args.shapes or ("tiny" if args.small else "0.5b,1.5b")).split(",")
    batches = [int(b) for b in (args.batches or ("4,8" if args.small else "64,256")).split(",")]
    prompt_len = args.prompt_len or (16 if args.small else 256)
    new_tokens = args.new_tokens or (16 if args.small else 512)
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}; valid: {', '.join(SHAPES)}")
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0 (0: off); got {args.lora_rank}")
    if args.lora_rank and (args.long_tail or args.memory):
        parser.error("--lora-rank prints its own table; run it without --long-tail and --memory")
    if args.json and args.memory:
        parser.error("--json takes the figures of one table; --memory prints per-process peaks only")
    if args.long_tail or args.memory:
        k = args.max_concurrent or (16 if args.small else 256)
        if args.long_tail:
            result = long_tail(model_config(shapes[0]), args.rows or (128 if args.small else 1024), prompt_len,
                               args.new_tokens or (128 if args.small else 4096),
                               args.median_len or (24 if args.small else 400), k, args.repeats)
            write_json(args.json, dict(shape=shapes[0], **result))
        if args.memory:
            memory_against_rows("tiny-kv" if args.small else shapes[0], [64, 256, 1024] if args.small else [256, 1024, 4096], k,
                                prompt_len, args.new_tokens or (32 if args.small else 512))
        return None

    if args.lora_rank:
        import jax

        print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
        rows = [row for shape in shapes
                for row in lora_sampling(shape, args.lora_rank, batches, prompt_len, new_tokens, args.repeats,
                                         args.max_concurrent, args.attention)]
        print_lora_table(rows, args.lora_rank, prompt_len, new_tokens)
        write_json(args.json, dict(rank=args.lora_rank, prompt_len=prompt_len, rows=[
            dict(dataclasses.asdict(r), tokens=r.tokens, merged_over_on_the_fly=r.on_the_fly_s / r.merged_s)
            for r in rows]))
        return rows

    hf = {}
    if not args.no_hf:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        for shape in shapes:
            for batch in batches:
                hf[shape, batch] = time_transformers(shape, batch, prompt_len, new_tokens, device)
                print(f"transformers {shape} batch {batch}: {hf[shape, batch]:.2f} s "
                      f"({batch * new_tokens / hf[shape, batch]:,.0f} tokens/s)", flush=True)

    import jax
    from flax import nnx

    from cfpo_jax.models import Transformer

    device_kind = jax.devices()[0].device_kind
    chip = chips.lookup(device_kind)
    published = (f"{chip.hbm_bytes_per_s / 1e9:,.0f} GB/s ({chip.source})" if chip
                 else "unknown (not in benchmarks/chips.py)")
    print(f"jax {jax.__version__} on {device_kind}; published HBM bandwidth: {published}", flush=True)
    bandwidth = copy_bandwidth(args.small)
    print(f"copy bandwidth: {bandwidth / 1e9:,.1f} GB/s (read + write)", flush=True)
    rows = []
    for shape in shapes:
        config = model_config(shape)
        for batch in batches:
            model = Transformer(config, rngs=nnx.Rngs(0))
            num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
            prompts = random_prompts(config, batch, prompt_len)
            engine = dict(max_concurrent=args.max_concurrent, attention=args.attention)
            call_s = time_generate(model, prompts, new_tokens, args.repeats, profile=args.profile, **engine)
            prefill_s = time_generate(model, prompts, 1, args.repeats, **engine)
            del model
            gc.collect()
            # The 1-token call holds the prefill and step 0: the rest is steps 1 .. N-1.
            read = decode_bytes(config, num_params, batch, prompt_len, range(1, new_tokens))
            rows.append(Row(shape, batch, call_s, prefill_s, hf.get((shape, batch)), read, new_tokens))
            print(f"cfpo_jax {shape} batch {batch}: {call_s:.3f} s, prefill+1 {prefill_s:.3f} s, "
                  f"{num_params / 1e6:.0f}M params", flush=True)

    print(f"\nprompt {prompt_len} tokens, {new_tokens} new tokens, bf16, temperature 1, no EOS; "
          f"bandwidth {bandwidth / 1e9:,.0f} GB/s")
    header = (f"{'shape':>6} {'batch':>5} {'cfpo_jax tok/s':>14} {'transformers tok/s':>18} "
              f"{'ratio':>7} {'decode ms/step':>14} {'roofline ms/step':>16} {'roof':>6} {'roof (spec)':>11}")
    print(header)
    print("-" * len(header))
    figures = []
    for r in rows:
        # Fraction of the roofline: the time the decode's reads need at a bandwidth over the time it took.
        roof = r.decode_bytes / bandwidth / r.decode_s
        roof_spec = r.decode_bytes / chip.hbm_bytes_per_s / r.decode_s if chip else None
        hf_tps = f"{r.tokens / r.hf_s:,.0f}" if r.hf_s else "-"
        ratio = f"{r.hf_s / r.jax_s:.1f}x" if r.hf_s else "-"
        print(f"{r.shape:>6} {r.batch:>5} {r.tokens / r.jax_s:>14,.0f} {hf_tps:>18} {ratio:>7} "
              f"{1e3 * r.decode_s / (r.new_tokens - 1):>14.3f} "
              f"{1e3 * r.decode_bytes / bandwidth / (r.new_tokens - 1):>16.3f} {roof:>6.0%} "
              f"{'-' if roof_spec is None else f'{roof_spec:.0%}':>11}")
        figures.append(dict(dataclasses.asdict(r), prompt_len=prompt_len, tokens_per_s=r.tokens / r.jax_s,
                            decode_ms_per_step=1e3 * r.decode_s / (r.new_tokens - 1), roofline_fraction=roof,
                            roofline_fraction_spec=roof_spec))
    write_json(args.json, dict(device_kind=device_kind, copy_bandwidth=bandwidth,
                               hbm_bandwidth_spec=chip.hbm_bytes_per_s if chip else None, rows=figures))
    return rows



if __name__ == "__main__":
    main()
