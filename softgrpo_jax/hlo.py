"""Reading compiled XLA programs: which collectives (or other instructions) run inside a loop (per decode step, not
once per call); the float32 copies XLA:CPU makes of bf16 arguments."""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter",
               "collective-broadcast", "ragged-all-to-all")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+(?:\([^\n]*\))?.*\{\s*$")
_CALLS = re.compile(r"(?:body|condition|calls|to_apply|branch_computations|called_computations)=\{?([^}\s,]+(?:,\s*%[\w.\-]+)*)\}?")
_OP = re.compile(r"=\s*[^=]*?\s(" + "|".join(re.escape(c) for c in COLLECTIVES) + r")(?:-start)?\(")


def computations(hlo: str) -> dict[str, list[str]]:
    """The HLO text's computations by name, each as its instruction lines."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        if name is None:
            m = _HEADER.match(line.strip())
            if m and "=" not in line.split("{")[0].split("(")[0]:
                name = m.group(1)
                comps[name] = []
            continue
        if line.strip() == "}":
            name = None
            continue
        comps[name].append(line)
    return comps


def _callees(line: str) -> list[str]:
    out = []
    for m in _CALLS.finditer(line):
        out += [c.strip().lstrip("%") for c in m.group(1).split(",")]
    return out


def collectives_in_loops(hlo: str) -> list[tuple[str, str]]:
    """(collective, instruction line) for every collective that a ``while`` body runs, directly or through the
    computations it calls (fusions, nested loops, conditionals)."""
    return ops_in_loops(hlo, _OP)


def ops_in_loops(hlo: str, op: re.Pattern | tuple[str, ...]) -> list[tuple[str, str]]:
    """(opcode, instruction line) for every instruction of the opcodes ``op`` (names, or a pattern whose group 1
    is the opcode) that a ``while`` body runs, directly or through the computations it calls: per step, not once
    per call (e.g. ``("dot",)``: the GEMMs of a decode step)."""
    if not isinstance(op, re.Pattern):
        op = re.compile(r"=\s*[^=]*?\s(" + "|".join(re.escape(c) for c in op) + r")\(")
    comps = computations(hlo)
    bodies = [m.group(1).lstrip("%") for lines in comps.values() for line in lines
              for m in re.finditer(r"body=%?([\w.\-]+)", line)]
    seen, stack, found = set(), list(bodies), []
    while stack:
        c = stack.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            m = op.search(line)
            if m:
                found.append((m.group(1), line.strip()))
            stack += _callees(line)
    return found


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(collective, instruction line) for every collective anywhere in the program."""
    return [(m.group(1), line.strip()) for line in hlo.splitlines() if (m := _OP.search(line))]


_ENTRY = re.compile(r"^ENTRY\s+%?([\w.\-]+)")
_PARAM = re.compile(r"^\s*%([\w.\-]+)\s*=\s*bf16\[[\d,]*\]\S*\s+parameter\(")
_UPCAST = re.compile(r"^\s*%([\w.\-]+)\s*=\s*f32\[([\d,]*)\]\S*\s+(convert|fusion)\(%([\w.\-]+)\)(.*)$")


def argument_upcasts(hlo: str) -> int:
    """Bytes of the float32 copies that the program's entry computation makes of whole bfloat16 arguments (a
    ``convert``, or a fusion that is only one). XLA:CPU (jax 0.10) runs a bf16 dot on float32 operands, and a
    loop-invariant operand's convert is hoisted out of the loop: a decode loop over bf16 weights then holds a
    float32 copy of all of them. GPU and TPU read bf16 operands in the dot itself, so a plan compiled on CPU for
    them leaves these out."""
    entry = next((m.group(1) for line in hlo.splitlines() if (m := _ENTRY.match(line))), None)
    comps = computations(hlo)
    if entry not in comps:
        return 0
    params = {m.group(1) for line in comps[entry] if (m := _PARAM.match(line))}

    def only_convert(name: str) -> bool:
        body = [line.strip() for line in comps.get(name, []) if line.strip()]
        return len(body) == 2 and "parameter(0)" in body[0] and body[1].startswith("ROOT") and " convert(" in body[1]

    total = 0
    for line in comps[entry]:
        m = _UPCAST.match(line)
        if not m or m.group(4) not in params:
            continue
        if m.group(3) == "fusion":
            callee = re.search(r"calls=%?([\w.\-]+)", m.group(5))
            if not callee or not only_convert(callee.group(1)):
                continue
        dims = [int(d) for d in m.group(2).split(",") if d]
        total += 4 * math.prod(dims)
    return total
