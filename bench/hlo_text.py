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

import re

# Instructions that are not kernels: values, views and markers.
_NOT_KERNELS = frozenset(
    "parameter get-tuple-element tuple bitcast constant after-all partition-id replica-id "
    "opt-barrier".split()
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_ENTRY = re.compile(r"^ENTRY\s+%?([\w.\-]+)\s")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*? ([a-z][\w\-]*)\((.*)$")
_BODY = re.compile(r"body=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def computations(hlo: str) -> dict[str, list[tuple[str, str]]]:
    """{computation name: [(opcode, rest of the line)]} of an HLO module's text."""
    comps: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and " = " not in line:
                current = comps.setdefault(m.group(1), [])
        elif line.strip() == "}":
            current = None
        elif m := _INSTRUCTION.match(line):
            current.append((m.group(1), m.group(2)))
    return comps


def kernel_ops(comps, name: str, counts: dict | None = None, targets: dict | None = None):
    """Opcode counts of the instructions computation `name` runs as kernels, nested loop bodies
    and called computations included (once each, not times their trip count). Custom calls'
    targets are counted into `targets` when given."""
    counts = {} if counts is None else counts
    for op, rest in comps.get(name, []):
        if op == "while":
            kernel_ops(comps, _BODY.search(rest).group(1), counts, targets)
        elif op in ("call", "conditional"):
            for sub in re.findall(r"(?:to_apply|computations?)=\{?%?([\w.\-]+)", rest):
                kernel_ops(comps, sub, counts, targets)
        elif op not in _NOT_KERNELS:
            counts[op] = counts.get(op, 0) + 1
            if targets is not None and op == "custom-call" and (m := _TARGET.search(rest)):
                targets[m.group(1)] = targets.get(m.group(1), 0) + 1
    return counts


def loop_body_ops(hlo: str) -> dict[str, int]:
    """Opcode counts of the largest while-loop body of an optimised HLO module — in a generate
    program, the decode loop: on a GPU each fusion / custom-call (cuBLAS, cuDNN) / copy is a
    kernel launched per decode step, so the total against the step time tells launch
    overhead from bandwidth."""
    comps = computations(hlo)
    bodies = [_BODY.search(rest).group(1)
              for instrs in comps.values() for op, rest in instrs if op == "while"]  # fmt: skip
    counted = [kernel_ops(comps, b) for b in bodies]
    return max(counted, key=lambda c: sum(c.values()), default={})


def program_ops(hlo: str) -> tuple[dict[str, int], dict[str, int]]:
    """(opcode counts, custom-call target counts) of the kernels of the whole program (the
    entry computation and, once each, what it calls and loops over)."""
    entry = next((m.group(1) for line in hlo.splitlines() if (m := _ENTRY.match(line))), None)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    targets: dict[str, int] = {}
    return kernel_ops(computations(hlo), entry, targets=targets), targets


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
