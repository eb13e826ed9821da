"""The compiled decode step against its ideal on the chips (issue 35 point 4), in one run.

    python benchmarks/decode_bytes.py                      # the three recorded cases (minutes each)
    python benchmarks/decode_bytes.py --cases configs/math_qwen.py:1.5b-v5e@v5e-8 --top 12

For each config@target: the sampler's decode chunk (`cfpo_jax.aot.programs.sampler_programs`,
the run's own `sampling.decode_program` with the config's slots and KV cache) compiled by the
chip's compiler for compile-only devices, and one trip of its `while` loop — one decode step over
all slots — read from the compiled HLO (`report.loop_traffic`; the layers are unrolled, so one
trip is the whole step). Per chip:

* ideal bytes: the weights once (the sampling layout's bf16 copy — every matrix, the final norm,
  the unembedding; of an untied embedding table only the K rows fed) + the KV cache once at its
  *valid* length. Two valid lengths: S, the allocated columns (a step at the end of a
  full-length row: the most a step can need), and the mean over a rollout whose completions all
  run to max_new_tokens after a prompt filling its bucket (P - 1 + N / 2 columns);
* compiled bytes: every instruction of the step reading its operands and writing its output
  (fusions: what their fused computation touches — a slice of a buffer costs the slice, an
  in-place update its update), split by where the operand comes from: the weights, the KV cache
  (read by the attention kernel; its static shapes are the whole allocated cache), the cache
  write, and the rest (activations, logits, sampling, the outputs' bookkeeping);
* FLOPs: the step's matmul FLOPs from the HLO (`report.hlo_dot_flops` of the loop body; the
  attention kernel is a custom call, not counted) against 2 · (matmul params) · slots, where the
  matmul params exclude an untied embedding table (a lookup, no matmul);
* XLA's own `cost_analysis()` bytes for the whole program (TPU; the GPU compiler reports none),
  which counts the loop body once: a cross-check of the step's total.

`--top N` also prints the N largest (category, op, source op) groups of the step's traffic, summed
over its instructions (the layers): where any excess is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; nothing runs
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import compile as compile_benchmark  # noqa: E402  (benchmarks/compile.py)
from cfpo_jax import data  # noqa: E402
from cfpo_jax.aot import programs, report, targets  # noqa: E402

CASES = ("configs/math_qwen.py:1.5b-v5e@v5e-8", "configs/math_qwen.py:1.5b@h100x8",
         "configs/math_qwen.py:7b-v5p@v5p-8")
GB = 1e9


def _shard_bytes(leaf) -> int:
    return int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize


def _key(dtype, shape) -> str:
    return f"{np.dtype(dtype).name if str(dtype) != 'bfloat16' else 'bf16'}[{','.join(map(str, shape))}]"


def compile_decode(spec: str, target_name: str):
    """(config, model config, Program, mesh, compiled) of `spec`'s decode chunk on the target."""
    target = targets.get(target_name)
    config = compile_benchmark.load_config(spec)
    mesh = compile_benchmark.make_mesh(config, target, list(targets.devices(target_name)))
    model = compile_benchmark.policy_model_config(config)
    program = programs.sampler_programs(config, model, mesh)["decode"]
    with jax.default_matmul_precision("default"), programs.mesh_context(mesh):
        compiled = program.jitted.lower(*program.args).compile()
    return config, model, program, mesh, compiled


def _carry(body_lines, cache_keys):
    """(name of the while body's parameter, {tuple index: 'weights' / 'kv' / 'state'}): 'kv' for
    an element of a cache layer's per-chip type, 'weights' for a floating element the loop passes
    through unchanged (the compiler may carry the weights in its own layout), else 'state'."""
    line = next(line for line in body_lines if re.search(r"\bparameter\(0\)", line))
    name, text = line.split("=", 1)
    name = name.strip().removeprefix("ROOT").strip().lstrip("%")
    elements = re.findall(r"(\w+)\[([\d,]*)\]", text.split("parameter(0)")[0])
    gte = {}
    for body_line in body_lines:
        parsed = report._parse(body_line)
        if parsed and parsed[2] == "get-tuple-element" and parsed[3] == [name]:
            gte[parsed[0]] = int(re.search(r"index=(\d+)", parsed[4]).group(1))
    root = next(report._parse(x) for x in body_lines if x.lstrip().startswith("ROOT"))
    unchanged = {i for i, o in enumerate(root[3]) if gte.get(o) == i}
    return name, {i: "kv" if f"{t}[{d}]" in cache_keys else
                  "weights" if i in unchanged and t in ("bf16", "f16", "f32") else "state"
                  for i, (t, d) in enumerate(elements)}


def facts(config, model, program) -> dict:
    """What the ideal and the categories need from the decode program's abstract inputs (per chip)."""
    weights, slots = program.args[1], program.args[2]
    weight_leaves = [x for x in jax.tree.leaves(weights) if x.ndim > 0]
    cache_leaves = list(slots.cache.k) + list(slots.cache.v)
    K, _, S, _ = cache_leaves[0].sharding.shard_shape(cache_leaves[0].shape)
    embed = [x for p, x in jax.tree_util.tree_flatten_with_path(weights.top)[0]
             if x.ndim == 2 and "embed" in jax.tree_util.keystr(p)]
    # Matmul parameters: every weight but the norms' scales and the biases (and an untied
    # embedding table, below)
    matmul = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(weights)[0]
                 if x.ndim > 0 and not re.search(r"bias|scale", jax.tree_util.keystr(p)))
    return dict(
        slots=int(K), columns=int(S),
        cache_keys=sorted({_key(x.dtype, x.sharding.shard_shape(x.shape)) for x in cache_leaves}),
        weights_bytes=sum(_shard_bytes(x) for x in weight_leaves),
        untied_embed_bytes=0 if model.tie_embeddings or not embed else _shard_bytes(embed[0]),
        hidden=model.hidden_size, vocab=model.vocab_size, kv_bytes=sum(_shard_bytes(x) for x in cache_leaves),
        prompt=data.bucket_width(config.sampling.max_prompt_len), new=config.sampling.max_new_tokens,
        matmul_params=matmul - (0 if model.tie_embeddings else model.vocab_size * model.hidden_size))


def analyse(hlo: str, f: dict, top: int = 0) -> dict:
    """The decode step's traffic by category and its FLOPs (module doc) against the ideal."""
    body, rows = report.loop_traffic(hlo)
    lines = report._computations(hlo)[body]
    cache_keys = set(f["cache_keys"])
    param, carry = _carry(lines, cache_keys)
    # Where each value of the body comes from: an element of the carried tuple, through bitcasts
    # and in-place updates (an output the size of a cache operand it was computed from is that
    # cache, after this step's write, whatever its shape).
    origin, size = {}, {}
    for line in lines:
        parsed = report._parse(line)
        if not parsed:
            continue
        name, out_type, opcode, operands, attrs = parsed
        size[name] = report._bytes_of(out_type, hbm_only=False)
        if opcode == "get-tuple-element" and operands == [param]:
            origin[name] = carry.get(int(re.search(r"index=(\d+)", attrs).group(1)), "state")
        elif opcode == "bitcast" and operands and operands[0] in origin:
            origin[name] = origin[operands[0]]
        elif any(origin.get(o) == "kv" and size.get(o) == size[name] for o in operands):
            origin[name] = "kv"
    text = {p[0]: (line, p) for line in lines for p in [report._parse(line)] if p}
    vocab_dims = {str(f["vocab"]), str(-(-f["vocab"] // 256))}  # logits, and the sampler's block masses
    totals = dict(weights=0, kv=0, kv_write=0, logits=0, attention=0, activations=0)
    detail = []
    for inst, opcode, reads, written in rows:
        line, parsed = text[inst]
        shapes = [parsed[1]] + [text[o][1][1] for o, _ in reads if o in text]
        if any(set(dims.split(",")) & vocab_dims for s in shapes for _, dims in re.findall(r"(\w+)\[([\d,]*)\]", s)):
            other = "logits"  # the head's [slots, vocab] logits and the sampling passes over them
        elif "shard_map" in line:
            other = "attention"  # the decode kernel's partial outputs and their combination
        else:
            other = "activations"
        cats = {}
        for operand, nbytes in reads:
            cat = origin.get(operand, other)
            cat = other if cat == "state" else cat
            cats[cat] = cats.get(cat, 0) + nbytes
        kv_read = sum(b for o, b in reads if origin.get(o) == "kv")
        if kv_read and opcode != "custom-call" and written <= kv_read:
            # An in-place cache update: its read of the cache and its write are the cache write
            cats["kv_write"] = cats.pop("kv", 0) + written
        else:
            cats[other] = cats.get(other, 0) + written
        for cat, nbytes in cats.items():
            totals[cat] += nbytes
        op_name = re.search(r'op_name="([^"]*)"', line)
        where = re.sub(r"\.\d+$", "", op_name.group(1).split("/while/body/")[-1] if op_name else inst)
        detail.append((opcode, where, cats))
    K, S = f["slots"], f["columns"]
    ideal_weights = f["weights_bytes"] - f["untied_embed_bytes"] + (
        K * f["hidden"] * 2 if f["untied_embed_bytes"] else 0)
    mean_columns = f["prompt"] - 1 + f["new"] / 2
    out = dict(
        slots=K, columns=S, mean_columns=mean_columns, weights_ideal=ideal_weights,
        kv_full=f["kv_bytes"], kv_mean=f["kv_bytes"] * mean_columns / S,
        compiled=totals, compiled_total=sum(totals.values()),
        flops=report.hlo_dot_flops(hlo, body), model_flops=2 * f["matmul_params"] * K)
    if top:
        # Summed over the layers: (bytes, count) per (category, opcode, source op)
        groups = {}
        for opcode, where, cats in detail:
            for cat, nbytes in cats.items():
                if nbytes:
                    total, count = groups.get((cat, opcode, where), (0, 0))
                    groups[(cat, opcode, where)] = (total + nbytes, count + 1)
        out["top"] = sorted(((b, n, *key) for key, (b, n) in groups.items()), reverse=True)[:top]
    return out


def _peak(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="config@target (default: %(default)s)")
    parser.add_argument("--top", type=int, default=0, help="also list the N largest groups of the step's traffic")
    parser.add_argument("--save", help="also write each case's compiled HLO and facts into this directory")
    parser.add_argument("--load", help="analyse the HLO and facts --save wrote there instead of compiling")
    args = parser.parse_args()
    print(f"jax {jax.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; per chip, one decode "
          f"step; GB = 1e9 bytes")
    header = ("config", "target", "slots/chip", "cache cols S (mean valid)", "ideal GB: weights + KV at S (at mean)",
              "compiled GB: weights", "KV read", "KV write", "logits & sampling", "attention glue", "activations",
              "total", "compiled / ideal at S (at mean)",
              "XLA bytes GB", "FLOPs/step", "2·matmul params·slots", "ratio", "peak GB")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    tops = []
    for case in args.cases:
        spec, _, target_name = case.partition("@")
        stem = re.sub(r"[^\w.\-]+", "_", case)
        if args.load:
            with open(os.path.join(args.load, stem + ".json")) as fh:
                f = json.load(fh)
            with open(os.path.join(args.load, stem + ".hlo")) as fh:
                hlo = fh.read()
        else:
            config, model, program, _, compiled = compile_decode(spec, target_name)
            hlo = compiled.as_text()
            cost = compiled.cost_analysis()
            cost = (cost[0] if isinstance(cost, list) else cost) or {}
            f = dict(facts(config, model, program), xla_bytes=cost.get("bytes accessed"), peak=_peak(compiled))
            if args.save:
                os.makedirs(args.save, exist_ok=True)
                with open(os.path.join(args.save, stem + ".json"), "w") as fh:
                    json.dump(f, fh)
                with open(os.path.join(args.save, stem + ".hlo"), "w") as fh:
                    fh.write(hlo)
        r = dict(analyse(hlo, f, top=args.top), xla_bytes=f["xla_bytes"], peak=f["peak"])
        c = r["compiled"]
        ideal_s, ideal_mean = r["weights_ideal"] + r["kv_full"], r["weights_ideal"] + r["kv_mean"]
        xla = f"{r['xla_bytes'] / GB:.2f}" if r["xla_bytes"] else "—"
        print("| " + " | ".join((
            spec.removeprefix("configs/"), target_name, str(r["slots"]), f"{r['columns']} ({r['mean_columns']:.0f})",
            f"{r['weights_ideal'] / GB:.2f} + {r['kv_full'] / GB:.2f} = {ideal_s / GB:.2f} "
            f"({ideal_mean / GB:.2f})",
            f"{c['weights'] / GB:.2f}", f"{c['kv'] / GB:.2f}", f"{c['kv_write'] / GB:.3f}", f"{c['logits'] / GB:.2f}",
            f"{c['attention'] / GB:.2f}", f"{c['activations'] / GB:.2f}",
            f"{r['compiled_total'] / GB:.2f}",
            f"{r['compiled_total'] / ideal_s:.2f} ({r['compiled_total'] / ideal_mean:.2f})", xla,
            f"{r['flops']:.3g}", f"{r['model_flops']:.3g}", f"{r['flops'] / r['model_flops']:.3f}",
            f"{r['peak'] / GB:.2f}")) + " |", flush=True)
        if args.top:
            tops.append((case, r["top"]))
    for case, top in tops:
        print(f"\n{case}: where the step's traffic goes, by category and source op (MB per chip, summed "
              f"over the instructions: count)")
        for nbytes, count, cat, opcode, where in top:
            print(f"  {nbytes / 1e6:9.1f}  {count:4d} × {cat:11s} {opcode:13s} {where[-80:]}")


if __name__ == "__main__":
    main()
