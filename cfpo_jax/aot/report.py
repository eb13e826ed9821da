"""What a compiled program holds: its fused kernels, per-chip memory and cost.

* kernels: the custom-call targets of the compiled HLO that are fused attention kernels — cuDNN's
  (`__cudnn$fmha...`), Mosaic's (`tpu_custom_call`: splash, paged attention) and Triton's
  (`__gpu$xla.gpu.triton`: the Pallas GPU decode kernel).
* memory (`compiled.memory_analysis()`, per chip): arguments, outputs, aliased (donated and
  reused), temporaries; peak = arguments + outputs − aliased + temporaries, all that is live at
  once for the step.
* cost (per chip): the matmul FLOPs counted from the compiled HLO (`hlo_dot_flops`, loops per
  trip; fused attention kernels — cuDNN, splash, paged — are custom calls and not counted), and
  XLA's `cost_analysis()` bytes accessed where the compiler reports them (TPU; the GPU compiler
  reports none), which count a loop body once: an undercount, so a bound built on it stays a
  lower bound.
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
    """2 · (output elements) · (contracted elements) summed over the matmuls of a compiled HLO
    module's text — `dot`s, cuBLAS GEMM custom calls (GPU), `convolution`s (TPU lowers dots to
    them) — each `while` body counted once per trip: XLA's trip-count annotation (GPU), else the
    constant bound of its condition (a scan's `i < n`). XLA's own `cost_analysis()` counts a loop
    body once (a 6-step scan of matmuls on a v5e: 1/6 of the FLOPs), which is why this exists."""
    computations = _computations(hlo_text)
    shapes = {}
    for body in computations.values():
        for line in body:
            m = re.match(r"\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\S+?\[[\d,]*\])", line)
            if m:
                shapes[m.group(1).lstrip("%")] = _dims(m.group(2))
    flops_of = {}

    def trips(line):
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        if known:
            return int(known.group(1))
        condition = re.search(r"condition=%?([\w.\-]+)", line)
        bounds = [int(c) for l in computations.get(condition.group(1) if condition else "", ())
                  for c in re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", l)]
        return max(bounds) if bounds else 1

    def flops(name, stack=()):
        if name in flops_of:
            return flops_of[name]
        total = 0.0
        for line in computations.get(name, ()):
            total += _line_flops(line, shapes)
            repeat = trips(line) if re.search(r"\bwhile\(", line) else 1
            for callee in re.findall(r"(?:body|calls|to_apply|true_computation|false_computation|"
                                     r"branch_computations)=\{?%?([\w.\-]+)", line):
                if callee in computations and callee not in stack:
                    total += flops(callee, stack + (name,)) * (repeat if "body=%" + callee in line
                                                               or "body=" + callee in line else 1)
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
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+?\[[\d,]*\])\S*\s+(dot|custom-call|convolution)\((.*?)\)",
                 line)
    if not m or (m.group(2) == "custom-call" and "gemm" not in line):
        return 0.0
    out = _dims(m.group(1))
    operands = [o.strip().split(" ")[-1].lstrip("%") for o in m.group(3).split(",")]
    lhs = shapes.get(operands[0]) if operands else None
    if lhs is None:
        return 0.0
    if m.group(2) == "convolution":
        labels = re.search(r"dim_labels=(\w+)_(\w+)->", line)
        rhs = shapes.get(operands[1]) if len(operands) > 1 else None
        if labels is None or rhs is None:
            return 0.0
        # Contracted: the lhs feature dim(s), times the kernel's spatial (window) dims.
        contracted = math.prod(lhs[i] for i, c in enumerate(labels.group(1)) if c == "f")
        contracted *= math.prod(rhs[i] for i, c in enumerate(labels.group(2)) if c.isdigit())
        return 2.0 * math.prod(out) * contracted
    contracting = re.search(r'lhs_contracting_dims[=":\[{]+([\d,"]*)', line)
    if contracting is None:
        return 0.0
    dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))]
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in dims if d < len(lhs))


def compile_program(program, mesh) -> dict:
    """Lowers and compiles `program` (`cfpo_jax.aot.programs.Program`) with `mesh` in context, as
    the run traces it (`programs.mesh_context`). Returns a row: compiled, error, kernels,
    args/out/alias/temp/peak bytes, flops, bytes_accessed (None where the compiler reports none),
    compile_s."""
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
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return dict(
        compiled=True, error="", kernels=kernels(hlo),
        args=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
        alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
        peak=(memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
        flops=hlo_dot_flops(hlo), bytes_accessed=cost.get("bytes accessed"), compile_s=seconds)


def _error_line(e: Exception) -> str:
    """The line of a compile error that says what failed: XLA wraps Python errors raised inside
    the compiler (custom partitioning) in a traceback, whose last line is the error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = lines[-1] if lines and lines[0].endswith("(most recent call last):") else (lines or [""])[0]
    return f"{type(e).__name__}: {line[:300]}"
