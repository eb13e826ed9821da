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
* traffic (`loop_traffic`): the HBM bytes one trip of a loop reads and writes, per instruction,
  from the compiled HLO (a decode chunk's trip is one decode step: benchmarks/decode_bytes.py) —
  with what fusions actually touch (a slice of a buffer, an in-place update) and without TPU
  values held in on-chip memory, which XLA's whole-program `bytes accessed` does not separate.
"""

from __future__ import annotations

import math
import re
import time

import numpy as np

from cfpo_jax.aot import programs, targets

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


def hlo_dot_flops(hlo_text: str, computation: str | None = None) -> float:
    """2 · (output elements) · (contracted elements) summed over the matmuls of a compiled HLO
    module's text — `dot`s, cuBLAS GEMM custom calls (GPU), `convolution`s (TPU lowers dots to
    them) — each `while` body counted once per trip (`_trip_count`). XLA's own `cost_analysis()`
    counts a loop body once (a 6-step scan of matmuls on a v5e: 1/6 of the FLOPs), which is why this exists.
    `computation`: count from that computation (a loop body: one trip) instead of the entry."""
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
            looped = re.search(r"\bwhile\(", line)
            repeat = _trip_count(line, computations[name], computations) if looped else 1
            for callee in re.findall(r"(?:body|calls|to_apply|true_computation|false_computation|"
                                     r"branch_computations)=\{?%?([\w.\-]+)", line):
                if callee in computations and callee not in stack:
                    total += flops(callee, stack + (name,)) * (repeat if "body=%" + callee in line
                                                               or "body=" + callee in line else 1)
        flops_of[name] = total
        return total

    entry = computation or next((n for n, body in computations.items() if body and body[0].startswith("ENTRY")),
                                None)
    return flops(entry) if entry else 0.0


_NAME = r"%?([\w.\-]+)"


def _definition(lines, name):
    """The line of `lines` that defines the value `name` (None if none does)."""
    pattern = re.compile(r"\s*(?:ROOT\s+)?%?" + re.escape(name) + r"\s*=")
    return next((line for line in lines if pattern.match(line)), None)


def _constant(lines, name):
    """The integer `name` holds, following copies, if it is a constant in `lines`."""
    line = _definition(lines, name)
    value = line and re.search(r"\bconstant\((-?\d+)\)", line)
    if value:
        return int(value.group(1))
    copied = line and re.search(r"\bcopy\(" + _NAME + r"\)", line)
    return _constant(lines, copied.group(1)) if copied else None


def _operand_names(text):
    """The value names of an operand list: `%a, /*index=5*/%b` -> ["a", "b"]."""
    return [o.strip().split(" ")[-1].split("*/")[-1].lstrip("%") for o in text.split(",")]


def _trip_count(while_line, caller, computations) -> int:
    """Trips of the `while` on `while_line` (in the computation whose lines are `caller`): XLA's
    annotation where it gives one (GPU), else from the loop's counter — the condition's
    `counter < bound`, the step the body adds to the counter, and its start in the while's
    operand. The TPU compiler's windowed (collective) matmuls step by 2 from 0 to 4, say: 2 trips,
    not 4. Falls back to the largest integer constant of the condition."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if known:
        return int(known.group(1))
    condition = computations.get(re.search(r"condition=" + _NAME, while_line).group(1), [])
    body = computations.get(re.search(r"body=" + _NAME, while_line).group(1), [])
    constants = [int(c) for line in condition
                 for c in re.findall(r"[su](?:32|64)\[\]\S*\s+constant\((\d+)\)", line)]
    fallback = max(constants) if constants else 1
    compare = next((line for line in condition if line.lstrip().startswith("ROOT") and "compare(" in line), None)
    operands = compare and re.search(r"compare\(" + _NAME + r", " + _NAME + r"\), direction=(LT|LE|GT|GE)", compare)
    if not operands:
        return fallback
    lhs, rhs, direction = operands.groups()
    if _constant(condition, rhs) is None:  # `bound > counter`: make it `counter < bound`
        lhs, rhs, direction = rhs, lhs, {"GT": "LT", "GE": "LE"}.get(direction, direction)
    bound, counter = _constant(condition, rhs), _definition(condition, lhs)
    index = counter and re.search(r"get-tuple-element\(.*index=(\d+)", counter)
    root = next((line for line in body if line.lstrip().startswith("ROOT") and " tuple(" in line), None)
    if bound is None or direction not in ("LT", "LE") or not index or not root:
        return fallback
    index = int(index.group(1))
    updated = _operand_names(re.search(r" tuple\((.*)\)", root).group(1))
    step_line = _definition(body, updated[index])
    step = step_line and re.search(r"\badd\(" + _NAME + r", " + _NAME + r"\)", step_line)
    step = step and next((c for c in map(lambda n: _constant(body, n), step.groups()) if c), None)
    init_tuple = re.search(r"while\(" + _NAME + r"\)", while_line)
    init_line = init_tuple and _definition(caller, init_tuple.group(1))
    init_operands = init_line and re.search(r" tuple\((.*)\)", init_line)
    start = 0
    if init_operands:
        names = _operand_names(init_operands.group(1))
        start = (_constant(caller, names[index]) or 0) if index < len(names) else 0
    if not step or step <= 0:
        return fallback
    return max(0, -(-(bound + (direction == "LE") - start) // step))


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
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
        if labels is None:
            return 0.0
        groups = re.search(r"feature_group_count=(\d+)", line)
        features = math.prod(lhs[i] for i, c in enumerate(labels.group(1)) if c == "f")
        # Multiply-adds: batch · output features · input features per group, times, for each
        # spatial dim, the (output position, window tap) pairs that land on the input rather
        # than its padding. The TPU compiler writes some dots as a window over a padded size-1
        # input (`window={size=28 pad=27_27}`: an output dim made from the kernel), where each
        # output position meets one real input element, not the window's 28.
        spatial = {c: i for i, c in enumerate(labels.group(1)) if c.isdigit()}
        out_spatial = {c: i for i, c in enumerate(labels.group(3)) if c.isdigit()}
        window = _window(line, len(spatial))
        pairs = math.prod(_valid_taps(lhs[spatial[str(d)]], out[out_spatial[str(d)]], *window[d])
                          for d in range(len(spatial)))
        out_rest = math.prod(out) // max(1, math.prod(out[i] for i in out_spatial.values()))
        return 2.0 * out_rest * pairs * features // (int(groups.group(1)) if groups else 1)
    contracting = re.search(r'lhs_contracting_dims[=":\[{]+([\d,"]*)', line)
    if contracting is None:
        return 0.0
    dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))]
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in dims if d < len(lhs))


def _window(line, rank):
    """Per spatial dim of a convolution: (size, stride, pad_lo, lhs_dilate, rhs_dilate)."""
    text = re.search(r"window=\{([^}]*)\}", line)
    fields = dict(f.split("=", 1) for f in text.group(1).split()) if text else {}
    ints = lambda key, default: [int(v) for v in fields[key].split("x")] if key in fields else [default] * rank
    sizes, strides = ints("size", 1), ints("stride", 1)
    lhs_dilate, rhs_dilate = ints("lhs_dilate", 1), ints("rhs_dilate", 1)
    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * rank
    return list(zip(sizes, strides, pads, lhs_dilate, rhs_dilate))


def _valid_taps(input_size, output_size, size, stride, pad_lo, lhs_dilate, rhs_dilate) -> int:
    """(output position, window tap) pairs of one spatial dim whose tap reads an input element."""
    at = (np.arange(output_size)[:, None] * stride + np.arange(size)[None, :] * rhs_dilate
          - pad_lo)  # each pair's position in the dilated input
    return int(np.sum((at >= 0) & (at % lhs_dilate == 0) & (at // lhs_dilate < input_size)))


def compile_program(program, mesh) -> dict:
    """Lowers and compiles `program` (`cfpo_jax.aot.programs.Program`) with `mesh` in context, as
    the run traces it (`programs.mesh_context`). Returns a row: compiled, error, kernels,
    args/out/alias/temp/peak bytes, flops, bytes_accessed (None where the compiler reports none),
    compile_s."""
    start = time.time()
    try:
        options = targets.COMPILER_OPTIONS.get(mesh.devices.flat[0].platform, {})
        with programs.mesh_context(mesh):
            compiled = program.jitted.lower(*program.args).compile(compiler_options=options)
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


# ----------------------------------------------------------------------------- bytes per loop trip

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
             "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")  # a layout's memory space other than HBM: TPU VMEM, sync flags
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "iota"}
_SLICING = {"dynamic-slice", "slice", "gather"}
_IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}  # op -> operand index of the update
_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")


def _arrays(type_text: str) -> list[tuple[int, bool]]:
    """(logical bytes, in HBM) of each array of an HLO type, in order (tuples flattened)."""
    return [(_ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d), not _ON_CHIP.search(layout))
            for t, dims, layout in _ARRAY.findall(type_text)]


def _bytes_of(type_text: str, hbm_only: bool = True) -> int:
    """Logical bytes of an HLO type (an array or a tuple of arrays; layout padding not counted),
    by default only of the arrays in HBM (a TPU layout's `S(1)`: on-chip memory, not counted)."""
    return sum(b for b, hbm in _arrays(type_text) if hbm or not hbm_only)


def _parse(line):
    """(name, output type, opcode, operand names, attributes) of an HLO instruction line, or None."""
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    name, out_type, opcode, rest = m.groups()
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    operands = [o for o in re.findall(r"%([\w.\-]+)", rest[:end])]
    return name, out_type, opcode, operands, rest[end + 1:]


def _fusion_traffic(fused_lines, operand_bytes):
    """(bytes read per operand, bytes written) of one fusion from its fused computation: a
    parameter read only through slices / gathers costs what they take; the buffer a root
    dynamic-update-slice / scatter updates in place costs its update, read and written."""
    params, users, defs = {}, {}, {}
    for line in fused_lines:
        parsed = _parse(line)
        if not parsed:
            continue
        name, out_type, opcode, operands, attrs = parsed
        defs[name] = (out_type, opcode, operands, line.lstrip().startswith("ROOT"))
        if opcode == "parameter":
            params[int(re.search(r"parameter\((\d+)\)", line).group(1))] = name
        for i, o in enumerate(operands):
            users.setdefault(o, []).append((name, opcode, i))
    root = next((n for n, d in defs.items() if d[3]), None)
    roots = [root] if root is None or defs[root][1] != "tuple" else defs[root][2]
    in_place = {}  # parameter name -> update bytes
    written = 0
    for r in roots:
        out_type, opcode, operands, _ = defs.get(r, ("", "", [], False))
        if opcode in _IN_PLACE and operands and operands[0] in params.values():
            update = defs.get(operands[_IN_PLACE[opcode]], ("",))[0]
            in_place[operands[0]] = _bytes_of(update)
            written += _bytes_of(update)
        else:
            written += _bytes_of(out_type)
    read = []
    for index in range(len(operand_bytes)):
        name = params.get(index)
        uses = users.get(name, [])
        if name in in_place:
            read.append(min(in_place[name], operand_bytes[index]))
        elif uses and all(opcode in _SLICING and i == 0 for _, opcode, i in uses):
            read.append(min(sum(_bytes_of(defs[u][0], False) for u, _, _ in uses), operand_bytes[index]))
        else:
            read.append(operand_bytes[index])
    return read, written


def loop_traffic(hlo_text: str, body: str | None = None):
    """The HBM traffic of one trip of a compiled program's `while` loop — by default the one
    whose body is largest (a decode chunk: one decode step) — as (body name, a list of
    (instruction, opcode, [(operand, bytes read)], bytes written)), inner loops and calls
    expanded once per trip (`_trip_count`). Each instruction outside fusions reads its operands
    and writes its output, with the fused computation's view of what a fusion touches
    (`_fusion_traffic`); custom calls (the attention kernels) are charged every operand whole,
    as their static shapes say. Logical bytes: a TPU layout's tile padding is not counted."""
    computations = _computations(hlo_text)
    types = {}
    for lines in computations.values():
        for line in lines:
            parsed = _parse(line)
            if parsed:
                types[parsed[0]] = parsed[1]
    if body is None:
        bodies = [re.search(r"body=%?([\w.\-]+)", line).group(1)
                  for lines in computations.values() for line in lines if re.search(r"\bwhile\(", line)]
        if not bodies:
            raise ValueError("no while loop in the program")
        body = max(bodies, key=lambda b: len(computations.get(b, ())))
    rows = []

    def walk(name, repeat):
        for line in computations.get(name, ()):
            parsed = _parse(line)
            if not parsed:
                continue
            inst, out_type, opcode, operands, attrs = parsed
            if opcode in _FREE:
                continue
            if opcode in ("while", "call", "conditional") or opcode.endswith("-start") and "calls=" in attrs:
                trips = _trip_count(line, computations[name], computations) if opcode == "while" else 1
                for callee in re.findall(r"(?:body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", attrs):
                    walk(callee, repeat * trips)
                continue
            operand_bytes = [_bytes_of(types.get(o, "")) for o in operands]
            written = _bytes_of(out_type)
            if opcode == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", attrs)
                operand_bytes, written = _fusion_traffic(computations.get(called.group(1), ()), operand_bytes)
            elif opcode in _IN_PLACE:
                update = operand_bytes[_IN_PLACE[opcode]]
                operand_bytes = [update if i == 0 else b for i, b in enumerate(operand_bytes)]
                written = update
            elif opcode == "copy-start":  # (destination, source, context)
                written = sum(b for b, hbm in _arrays(out_type)[:1] if hbm)
            elif opcode.endswith("-start") and out_type.startswith("(("):  # ((operands), output, context)
                moved, out_hbm = _arrays(out_type)[len(operands)]
                operand_bytes = [min(moved, b) for b in operand_bytes]  # a slice-start reads its slice
                written = moved if out_hbm else 0
            elif opcode.endswith("-done") or opcode.endswith("-update"):
                continue  # the -start half carries the transfer
            rows.append((inst, opcode, [(o, b * repeat) for o, b in zip(operands, operand_bytes)],
                         written * repeat))

    walk(body, 1)
    return body, rows
