"""Arithmetic problems with step-by-step solutions, written by the workbench itself.

A 135M-parameter model cannot add two two-digit numbers in one token, but it can do one
small step at a time: split into tens and units, add each, add the parts. The traces spell
exactly those steps, in a fixed shape, so the model learns a procedure instead of memorising
answers. The problems are the bench's `arithmetic` task's kind (two-digit `+` and `-`, a
two-digit number times 3..12) plus three-term sums and differences; every question of the
bench's held-out set (`arithmetic_items`, seed 9) is excluded from training, compared by its
operands, so no phrasing of a held-out question is ever seen.

Unit conversions are deliberately not generated: 9 of the 32 `facts` questions are unit
facts ("How many grams are in 1 kilogram?"), and training on them would leak into the task
that checks the adapter leaves the model's knowledge alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from workbench.bench.tasks import arithmetic_items, draw_operands

TIMES = "\u00d7"


@dataclass(frozen=True)
class Problem:
    question: str
    trace: str
    """The reasoning, one step a line, as written inside the think block."""
    answer: str
    """The reply after the thinking: the expression and its value."""
    value: int
    key: tuple
    """(operator, operands...): what makes two problems the same whatever the phrasing."""


PHRASINGS = (
    "What is {e}?",
    "What is {e}?",
    "Calculate {e}.",
    "Compute {e}.",
    "{e} = ?",
    "How much is {e}?",
    "Work out {e}.",
    "What does {e} equal?",
)
WORDS = {"+": ("plus",), "-": ("minus",), "x": ("times", "multiplied by")}


def _split(n: int) -> tuple[int, int]:
    return n - n % 10, n % 10


def add_steps(a: int, b: int) -> list[str]:
    """47 + 38: tens, units, then the parts (a zero part is left out)."""
    (at, au), (bt, bu) = _split(a), _split(b)
    tens, units = at + bt, au + bu
    parts = [x for x in (at, bt, au, bu) if x]
    lines = [f"{a} + {b} = {' + '.join(map(str, parts))}"] if len(parts) > 2 else []
    if at and bt:
        lines.append(f"{at} + {bt} = {tens}")
    if au and bu:
        lines.append(f"{au} + {bu} = {units}")
    if tens and units:
        lines.append(f"{tens} + {units} = {a + b}")
    return lines or [f"{a} + {b} = {a + b}"]


def sub_steps(a: int, b: int) -> list[str]:
    """83 - 47: take the tens away, then the units."""
    bt, bu = _split(b)
    if bt == 0:
        return [f"{a} - {b} = {a - b}"]
    steps = [f"{a} - {b} = {a} - {bt} - {bu}", f"{a} - {bt} = {a - bt}"]
    if bu:
        steps.append(f"{a - bt} - {bu} = {a - b}")
    return steps


def mul_steps(a: int, b: int) -> list[str]:
    """47 x 8: tens times 8, units times 8, add the parts."""
    at, au = _split(a)
    if au == 0:
        return [f"{at // 10} {TIMES} {b} = {at // 10 * b}", f"{a} {TIMES} {b} = {a * b}"]
    left, right = at * b, au * b
    return [
        f"{a} {TIMES} {b} = {at} {TIMES} {b} + {au} {TIMES} {b}",
        f"{at} {TIMES} {b} = {left}",
        f"{au} {TIMES} {b} = {right}",
        *add_parts(left, right),
    ]


def add_parts(a: int, b: int) -> list[str]:
    """A product's parts (a multiple of ten plus at most 108): one step when the units part
    does not carry into the hundreds, else the hundreds are set aside first."""
    rest = a % 100
    if rest + b < 100:
        return [f"{a} + {b} = {a + b}"]
    return [
        f"{a} + {b} = {a - rest} + {rest} + {b}",
        f"{rest} + {b} = {rest + b}",
        f"{a - rest} + {rest + b} = {a + b}",
    ]


def _binary(op: str, a: int, b: int) -> tuple[str, list[str], int]:
    if op == "+":
        return f"{a} + {b}", add_steps(a, b), a + b
    if op == "-":
        return f"{a} - {b}", sub_steps(a, b), a - b
    return f"{a} {TIMES} {b}", mul_steps(a, b), a * b


def make(op: str, a: int, b: int, c: int | None = None, *, rng: random.Random | None = None) -> Problem:
    """One problem; `c` makes a three-term sum or difference ((a op b) + c or - c)."""
    rng = rng or random.Random(0)
    expression, steps, value = _binary(op, a, b)
    key: tuple = (op, a, b)
    if c is not None:
        second = rng.choice("+-") if value > c else "+"
        expression = f"{expression} {second} {c}"
        more, value = (add_steps(value, c), value + c) if second == "+" else (sub_steps(value, c), value - c)
        steps = [*steps, *more]
        key = (op, a, b, second, c)
    phrasing = rng.choice(PHRASINGS)
    if c is None and rng.random() < 0.25:  # "47 plus 38" as well as "47 + 38"
        shown = f"{a} {rng.choice(WORDS[op])} {b}"
    else:
        shown = expression
    return Problem(phrasing.format(e=shown), "\n".join(steps), f"{expression} = {value}", value, key)


def held_out_keys() -> set[tuple]:
    """The operands of the bench's arithmetic questions (workbench.bench.tasks, seed 9, the
    first 100, a superset of the 20 the task asks), which training never shows."""
    keys = set()
    for item in arithmetic_items(100):
        parts = item.question.removeprefix("What is ").removesuffix("?").split()
        a, symbol, b = int(parts[0]), parts[1], int(parts[2])
        keys.add(({"+": "+", "-": "-", TIMES: "x"}[symbol], a, b))
    return keys


def generate(
    count: int, seed: int = 0, *, exclude: set[tuple] | None = None, three_terms: float = 0.15
) -> list[Problem]:
    """`count` distinct problems; none whose (operator, operands) is in `exclude`."""
    rng = random.Random(seed)
    exclude = held_out_keys() if exclude is None else exclude
    seen: set[tuple] = set()
    out: list[Problem] = []
    while len(out) < count:
        op, a, b = draw_operands(rng)
        if (op, a, b) in exclude or a - b == 0:
            continue
        c = rng.randint(2, 49) if op != "x" and rng.random() < three_terms else None
        problem = make(op, a, b, c, rng=rng)
        if problem.key in seen:
            continue
        seen.add(problem.key)
        out.append(problem)
    return out
