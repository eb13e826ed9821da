"""What a compiled program holds: its fused kernels, per-chip memory and cost.

* kernels: the custom-call targets of the compiled HLO that are fused attention kernels — cuDNN's
  (`__cudnn$fmha...`), Mosaic's (`tpu_custom_call`: splash, paged attention) and Triton's
  (`__gpu$xla.gpu.triton`: the Pallas GPU decode kernel).
* memory (`compiled.memory_analysis()`, per chip): arguments, outputs, aliased (donated and
  reused), temporaries; peak = arguments + outputs − aliased + temporaries, all that is live at
  once for the step.
* cost (per chip): XLA's `cost_analysis()` FLOPs and bytes accessed. The TPU compiler reports
  them; the GPU one returns none, so for GPU programs the FLOPs are counted from the compiled
  HLO's dots and convolutions (2 · output elements · contracted size, `hlo_dot_flops`) and the
  bytes are left out: the cuDNN attention calls are not counted (their FLOPs are not in the HLO).
"""

from __future__ import annotations

import math
import re
import time

from cfpo_jax.aot import programs

KERNEL_PATTERNS = (r"__cudnn\$fmha\w*", r"tpu_custom_call", r"__gpu\$xla\.gpu\.triton\w*", r"triton_kernel_call")


def kernels(hlo_text: str) -> list[str]:
    """The fused-kernel custom-call targets in `hlo_text` (sorted, each once)."""
    found = set()
    for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
        if any(re.fullmatch(p, target) for p in KERNEL_PATTERNS):
            found.add(target)
    return sorted(found)


_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _dims(text):
    match = _SHAPE.search(text)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def hlo_dot_flops(hlo_text: str) -> float:
    """2 · (output elements) · (contracted elements) summed over the `dot` instructions of an HLO
    module's text, loops counted once per trip where XLA annotates a known trip count. cuBLAS
    GEMMs appear as custom calls after GPU compilation, so this counts those too (`__cublas$gemm`
    with its dot dimension numbers)."""
    computations = _computations(hlo_text)
    shapes = {}
    for body in computations.values():
        for line in body:
            m = re.match(r"\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\S+?\[[\d,]*\])", line)
            if m:
                shapes[m.group(1).lstrip("%")] = _dims(m.group(2))
    flops_of = {}

    def flops(name, stack=()):
        if name in flops_of:
            return flops_of[name]
        total = 0.0
        for line in computations.get(name, ()):
            total += _line_flops(line, shapes)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for callee in re.findall(r"(?:body|calls|to_apply|true_computation|false_computation|"
                                     r"branch_computations)=\{?%?([\w.\-]+)", line):
                if callee in computations and callee not in stack:
                    total += flops(callee, stack + (name,)) * (int(trips.group(1)) if trips and "body=" in line else 1)
        flops_of[name] = total
        return total

    entry = next((n for n, body in computations.items() if body and body[0].startswith("ENTRY")), None)
    return flops(entry) if entry else 0.0


def _computations(hlo_text):
    out, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?.*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(2)
            out[name] = [line] if header.group(1) else []
        elif name is not None and line.startswith(" "):
            out[name].append(line)
    return out


def _line_flops(line, shapes):
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+?\[[\d,]*\])\S*\s+(dot|custom-call)\((.*?)\)", line)
    if not m:
        return 0.0
    if m.group(2) == "custom-call" and "gemm" not in line:
        return 0.0
    out = _dims(m.group(1))
    operands = [o.strip().split(" ")[-1].lstrip("%") for o in m.group(3).split(",")]
    lhs = shapes.get(operands[0]) if operands else None
    contracting = re.search(r'lhs_contracting_dims[=":\[{]+([\d,"]*)', line)
    if lhs is None or contracting is None:
        return 0.0
    dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))]
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in dims if d < len(lhs))


def compile_program(program, mesh) -> dict:
    """Lowers and compiles `program` (`cfpo_jax.aot.programs.Program`) with `mesh` in context, as
    the run traces it (`programs.mesh_context`). Returns a row: compiled, error, kernels, args/out/alias/temp/peak bytes,
    flops, bytes_accessed (None where the compiler reports none), flops_source, compile_s."""
    start = time.time()
    try:
        with programs.mesh_context(mesh):
            compiled = program.jitted.lower(*program.args).compile()
    except Exception as e:  # a compile error is a result: the row says which one
        return dict(compiled=False, error=_error_line(e),
                    kernels=[], compile_s=time.time() - start)
    seconds = time.time() - start
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and cost.get("flops"):
        flops, bytes_accessed, source = cost["flops"], cost.get("bytes accessed"), "xla"
    else:
        flops, bytes_accessed, source = hlo_dot_flops(hlo), None, "hlo dots (fused attention not counted)"
    return dict(
        compiled=True, error="", kernels=kernels(hlo),
        args=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
        alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
        peak=(memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        flops=flops, bytes_accessed=bytes_accessed, flops_source=source, compile_s=seconds)


def _error_line(e: Exception) -> str:
    """The line of a compile error that says what failed: XLA wraps Python errors raised inside
    the compiler (custom partitioning) in a traceback, whose last line is the error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = lines[-1] if lines and lines[0].endswith("(most recent call last):") else (lines or [""])[0]
    return f"{type(e).__name__}: {line[:300]}"
