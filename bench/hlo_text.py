"""Reading compiled XLA programs as text: what runs as a kernel, and how it is launched.

Two texts, both from XLA's GPU compiler:

  optimised HLO        `compiled.as_text()`: computations of instructions. On a GPU every
                       fusion, custom call (cuBLAS, cuDNN) and copy of a computation that runs
                       (the entry, loop bodies, called computations) is one kernel; a fusion's
                       own body is inside its kernel.
  thunk sequence       XLA's dump `*.thunk_sequence_after_thunk_passes.txt`: the runtime's
                       program, one thunk per line, children indented under their parent
                       (a `kWhile`'s condition and body, a `kCommandBuffer`'s kernels). A
                       command buffer is a CUDA graph: its kernels cost the host one graph
                       launch, not one launch each.

bench/decode.py counts the kernels of a decode step from the first; bench/gpu_aot.py reads
both for programs compiled for an H200 on a machine without one.
"""

from __future__ import annotations

import math
import re

# Instructions that are not kernels: values, views and markers.
_NOT_KERNELS = frozenset(
    "parameter get-tuple-element tuple bitcast constant after-all partition-id replica-id "
    "opt-barrier".split()
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_ENTRY = re.compile(r"^ENTRY\s+%?([\w.\-]+)\s")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_BODY = re.compile(r"body=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_ALIASED_OUTPUT = re.compile(r"\{(\d+)\}: \(\d+")  # output_to_operand_aliasing={{1}: (4, {})}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
             "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
             "f64": 8}  # fmt: skip


def computations(hlo: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """{computation name: [(opcode, rest of the line, instruction name, result shape)]} of an
    HLO module's text."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and " = " not in line:
                current = comps.setdefault(m.group(1), [])
        elif line.strip() == "}":
            current = None
        elif m := _INSTRUCTION.match(line):
            name, shape, op, rest = m.groups()
            current.append((op, rest, name, shape))
    return comps


def _kernels(comps, name: str):
    """(computation, instruction) of every instruction computation `name` runs as a kernel,
    nested loop bodies and called computations included (once each, not times their trip
    count)."""
    for ins in comps.get(name, []):
        op, rest = ins[0], ins[1]
        if op == "while":
            yield from _kernels(comps, _BODY.search(rest).group(1))
        elif op in ("call", "conditional"):
            for sub in re.findall(r"(?:to_apply|computations?)=\{?%?([\w.\-]+)", rest):
                yield from _kernels(comps, sub)
        elif op not in _NOT_KERNELS:
            yield name, ins


def kernel_ops(comps, name: str, counts: dict | None = None, targets: dict | None = None):
    """Opcode counts of the instructions computation `name` runs as kernels (see `_kernels`).
    Custom calls' targets are counted into `targets` when given."""
    counts = {} if counts is None else counts
    for _, (op, rest, *_) in _kernels(comps, name):
        counts[op] = counts.get(op, 0) + 1
        if targets is not None and op == "custom-call" and (m := _TARGET.search(rest)):
            targets[m.group(1)] = targets.get(m.group(1), 0) + 1
    return counts


def _arrays(shape: str) -> list[tuple[int, int]]:
    """[(item size, elements)] of the arrays of a (possibly tuple) shape."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _ITEMSIZE:
            out.append((_ITEMSIZE[dtype], math.prod(int(d) for d in dims.split(",") if d)))
    return out


def _nbytes(shape: str) -> int:
    return sum(size * n for size, n in _arrays(shape))


def _operands(rest: str) -> list[str]:
    """Operand names: the `%names` inside the instruction's outermost parentheses."""
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "("
        if ch == ")":
            if depth == 0:
                return re.findall(r"%([\w.\-]+)", rest[:i])
            depth -= 1
    return re.findall(r"%([\w.\-]+)", rest)


def _sliced_params(comps, fused: str) -> dict[int, int]:
    """{parameter index: bytes} for the parameters of fused computation `fused` that are only
    sliced inside it (a fused slice reads the slice, not the operand), also through bitcasts and
    converts (a gradient sliced out of a stacked one, converted to float32 on the way). A
    gather's operand (not its indices) counts so too, an element per element gathered and at
    most whole, in any kind of fusion: the chosen experts' kernels that a few-token MoE step's
    reductions gather (models/moe.py) are read, not all E."""
    instrs = comps.get(fused, [])
    users: dict[str, list] = {}
    for uop, urest, uname, ushape in instrs:
        if uop != "parameter":
            operands = _operands(urest)
            for o in set(operands):
                # (a gather's indices are read whole: only its operand 0 is read in part)
                uop_o = "gather-indices" if uop == "gather" and o != operands[0] else uop
                users.setdefault(o, []).append((uop_o, uname, ushape))

    def sliced_elements(name: str) -> int | None:  # None: some use reads it whole
        total = 0
        for uop, uname, ushape in users.get(name, []):
            if uop in ("slice", "dynamic-slice", "gather"):
                total += sum(n for _, n in _arrays(ushape))
            elif uop in ("bitcast", "convert") and (n := sliced_elements(uname)) is not None:
                total += n
            else:
                return None
        return total if users.get(name) else None

    out = {}
    for op, rest, pname, pshape in instrs:
        if op == "parameter" and (n := sliced_elements(pname)) is not None:
            itemsize = _arrays(pshape)[0][0] if _arrays(pshape) else 1
            whole = sum(m for _, m in _arrays(pshape))  # (a gather may read an element twice)
            out[int(rest.split(")")[0])] = min(n, whole) * itemsize
    return out


def kernel_traffic(comps, name: str) -> dict[str, int]:
    """Bytes the kernels of computation `name` read and write (see `_kernels`), by kind:
    "matmul" (cuBLAS calls, Triton gemm fusions), "attention" (cuDNN calls, Pallas kernels:
    Triton custom calls) and "other" (the memory-bound rest: elementwise, reductions, copies,
    cache writes). An estimate from operand and result shapes, caches not modelled: an
    operand passed twice counts once; a custom call's output aliasing an operand (updated in
    place) is not counted again (the Pallas decode kernel reads its cache operand only up to
    the written slots, which no shape shows, so its figure is an upper bound); an in-place
    dynamic-update-slice counts
    its update only; a loop fusion reads at most one element of an operand per element it
    writes (an embedding lookup reads the rows it gathers, not the table); an operand a fusion
    only slices, or gathers from, counts as the slice or the elements gathered."""
    shapes = {c: {ins[2]: ins[3] for ins in instrs} for c, instrs in comps.items()}
    out = {"matmul": 0, "attention": 0, "other": 0}
    for comp, (op, rest, iname, shape) in _kernels(comps, name):
        target = (m.group(1) if (m := _TARGET.search(rest)) else "").lower()
        kind = ("matmul" if "gemm" in iname or "cublas" in target else
                "attention" if "cudnn" in target or "triton" in target else "other")  # fmt: skip
        sliced = {}
        if op == "fusion" and (called := re.search(r"calls=%?([\w.\-]+)", rest)):
            sliced = _sliced_params(comps, called.group(1))
        elementwise = "kind=kLoop" in rest or op in ("copy", "convert", "add", "multiply", "select")
        cap = max((n for _, n in _arrays(shape)), default=0) if elementwise else None
        # Each use of an operand: its slice if sliced; in an elementwise kernel at most one
        # element per element written. An operand passed twice is read once: its uses add up,
        # to at most the whole of it.
        used: dict[str, list] = {}
        for i, o in enumerate(_operands(rest)):
            whole = _arrays(shapes[comp].get(o, ""))
            uses = [(size, sliced[i] // size if i in sliced else n) for size, n in whole]
            uses = [(size, min(n, cap) if cap is not None else n) for size, n in uses]
            if o in used:
                uses = [(size, min(w, n + m)) for (size, n), (_, m), (_, w)
                        in zip(uses, used[o], whole)]  # fmt: skip
            used[o] = uses
        reads = list(used.values())
        if "dynamic_update_slice" in iname or op == "dynamic-update-slice":
            sizes = sorted(sum(s * n for s, n in a) for a in reads)
            out[kind] += 2 * sum(sizes[:-1])  # the update, read and written in place
            continue
        out[kind] += sum(size * n for a in reads for size, n in a)
        results = _arrays(shape)
        if op == "custom-call" and "output_to_operand_aliasing" in rest:
            # An output aliasing an operand is that buffer updated in place (the Pallas decode
            # kernel's cache: it writes one slot), already counted as read.
            aliased = {int(i) for i in _ALIASED_OUTPUT.findall(rest)}
            results = [a for i, a in enumerate(results) if i not in aliased]
        out[kind] += sum(size * n for size, n in results)
    return out


def _largest_loop_body(comps) -> str | None:
    """The while-loop body with the most kernels (in a generate program, the decode loop)."""
    bodies = [_BODY.search(rest).group(1)
              for instrs in comps.values() for op, rest, *_ in instrs if op == "while"]  # fmt: skip
    return max(bodies, key=lambda b: sum(1 for _ in _kernels(comps, b)), default=None)


def _entry(hlo: str) -> str:
    entry = next((m.group(1) for line in hlo.splitlines() if (m := _ENTRY.match(line))), None)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return entry


def loop_body_ops(hlo: str) -> dict[str, int]:
    """Opcode counts of the largest while-loop body of an optimised HLO module — in a generate
    program, the decode loop: on a GPU each fusion / custom-call (cuBLAS, cuDNN) / copy is a
    kernel launched per decode step, so the total against the step time tells launch
    overhead from bandwidth."""
    comps = computations(hlo)
    body = _largest_loop_body(comps)
    return kernel_ops(comps, body) if body else {}


def program_ops(hlo: str) -> tuple[dict[str, int], dict[str, int]]:
    """(opcode counts, custom-call target counts) of the kernels of the whole program (the
    entry computation and, once each, what it calls and loops over)."""
    targets: dict[str, int] = {}
    return kernel_ops(computations(hlo), _entry(hlo), targets=targets), targets


def traffic(hlo: str) -> dict[str, dict[str, int]]:
    """`kernel_traffic` of the whole program ("program", loop bodies once) and of one
    iteration of its largest loop ("loop", absent without loops)."""
    comps = computations(hlo)
    out = {"program": kernel_traffic(comps, _entry(hlo))}
    if body := _largest_loop_body(comps):
        out["loop"] = kernel_traffic(comps, body)
    return out


# ----------------------------------------------------------------------------------------------
# The thunk sequence

_THUNK = re.compile(r"^(\s*)(\d+): (k\w+)")


def thunk_tree(text: str) -> list[tuple[str, int | None]]:
    """[(thunk kind, index of its parent or None)] in file order: a thunk's parent is the
    nearest thunk above it that is indented less (`condition:` / `body:` labels are not
    thunks; their thunks hang under the kWhile)."""
    nodes: list[tuple[str, int | None]] = []
    stack: list[tuple[int, int]] = []  # (indent, index) of the open ancestors
    for line in text.splitlines():
        m = _THUNK.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        nodes.append((m.group(3), stack[-1][1] if stack else None))
        stack.append((indent, len(nodes) - 1))
    return nodes


def _launches(nodes, members: set[int]) -> dict:
    """Host launches of the thunks `members`: a command buffer is one launch (a CUDA graph),
    a kernel outside any command buffer is one; control thunks (loops, conditionals) are not
    launches themselves."""
    parents = {p for _, p in nodes if p is not None}

    def in_graph(i):
        p = nodes[i][1]
        while p is not None:
            if nodes[p][0] == "kCommandBuffer":
                return True
            p = nodes[p][1]
        return False

    leaves = [i for i in members if i not in parents]
    graphs = [i for i in members if nodes[i][0] == "kCommandBuffer" and not in_graph(i)]
    outside = [i for i in leaves if not in_graph(i)]
    return {
        "kernels": len(leaves),
        "graph_launches": len(graphs),
        "kernels_outside_graphs": len(outside),
        "host_launches": len(graphs) + len(outside),
    }


def thunk_launches(text: str) -> dict:
    """How a program's kernels are launched: for the whole program (each loop body counted
    once) and per iteration of its largest loop (`loop`, absent without loops) — kernels,
    CUDA-graph launches, kernels launched one by one, and their sum, the host launches."""
    nodes = thunk_tree(text)

    def descendants(root):
        out, frontier = set(), {root}
        while frontier:
            frontier = {i for i, (_, p) in enumerate(nodes) if p in frontier}
            out |= frontier
        return out

    rec = {"program": _launches(nodes, set(range(len(nodes))))}
    loops = [descendants(i) for i, (kind, _) in enumerate(nodes) if kind == "kWhile"]
    if loops:
        rec["loop"] = _launches(nodes, max(loops, key=len))
    return rec
