"""`arith`: a generated, seeded arithmetic set in five levels, from one-digit sums to word problems.

Each problem is drawn from its own random stream, seeded by (seed, level, index), so problem 7
of level 3 is the same whatever the count asked for and on every machine.

  1  one-digit sums                      3 + 5
  2  two-digit addition and subtraction  47 + 38, 91 - 29
  3  products and three-term sums        12 * 7, 23 + 45 + 17
  4  multi-step expressions              (12 + 7) * 3 - 5
  5  multi-step word problems            two or three operations in a short story
"""
from __future__ import annotations

import random

LEVELS = (1, 2, 3, 4, 5)
DEFAULT_COUNT = 100  # problems per level when no --limit is given

_NAMES = ("Tom", "Mia", "Li Wei", "Sara", "Ahmed", "Yuki", "Elena", "Ravi")
_ITEMS = ("apples", "stickers", "marbles", "pencils", "cookies", "stamps")


def _level1(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(1, 9), r.randint(1, 9)
    return f"What is {a} + {b}?", a + b


def _level2(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    if r.random() < 0.5:
        return f"What is {a} + {b}?", a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", a - b


def _level3(r: random.Random) -> tuple[str, int]:
    if r.random() < 0.5:
        a, b = r.randint(2, 19), r.randint(2, 12)
        return f"What is {a} * {b}?", a * b
    a, b, c = r.randint(10, 60), r.randint(10, 60), r.randint(10, 60)
    return f"What is {a} + {b} + {c}?", a + b + c


def _level4(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(2, 20), r.randint(2, 20), r.randint(2, 9)
    d = r.randint(1, (a + b) * c - 1)
    form = r.randrange(3)
    if form == 0:
        return f"Compute ({a} + {b}) * {c} - {d}.", (a + b) * c - d
    if form == 1:
        return f"Compute {a} * {c} + {b} * {c} - {d}.", a * c + b * c - d
    e = r.randint(2, 9)
    return f"Compute ({a} + {b}) * {c} - {e} * {c}.", (a + b) * c - e * c


def _level5(r: random.Random) -> tuple[str, int]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    form = r.randrange(4)
    if form == 0:
        a, b, c = r.randint(5, 30), r.randint(2, 6), r.randint(3, 12)
        d = r.randint(1, a + b * c - 1)
        return (f"{name} has {a} {item}. {name} buys {b} packs with {c} {item} in each pack, then gives "
                f"{d} {item} to a friend. How many {item} does {name} have now?", a + b * c - d)
    if form == 1:
        price, count = r.randint(2, 15), r.randint(2, 9)
        bill = next(v for v in (20, 50, 100, 200) if v > price * count)
        return (f"A shop sells notebooks for {price} dollars each. {name} buys {count} notebooks and pays "
                f"with a {bill}-dollar bill. How many dollars of change does {name} get?", bill - price * count)
    if form == 2:
        s1, h1, s2, h2 = r.randint(40, 90), r.randint(2, 5), r.randint(40, 90), r.randint(1, 4)
        return (f"A train travels at {s1} km per hour for {h1} hours, then at {s2} km per hour for {h2} "
                f"hours. How many kilometres does it travel in total?", s1 * h1 + s2 * h2)
    per_day, days = r.randint(5, 25), r.randint(3, 9)
    total = per_day * days + r.randint(10, 150)
    return (f"A book has {total} pages. {name} reads {per_day} pages a day for {days} days. "
            f"How many pages are left to read?", total - per_day * days)


_GENERATORS = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}


def problem(level: int, index: int, seed: int = 0) -> tuple[str, str]:
    """The question and gold answer of problem `index` of `level` under `seed`."""
    r = random.Random(f"thinktime-arith:{seed}:{level}:{index}")  # str seeds hash with SHA-512: stable
    question, answer = _GENERATORS[level](r)
    return question, str(answer)


def generate(levels: tuple[int, ...] = LEVELS, count: int | None = None, seed: int = 0) -> list[dict]:
    """Rows (id, question, answer, level). Several levels interleave, so a --limit takes a spread."""
    per_level = count if count is not None else DEFAULT_COUNT
    if len(levels) > 1 and count is not None:
        per_level = -(-count // len(levels))
    rows = []
    for index in range(per_level):
        for level in levels:
            question, answer = problem(level, index, seed)
            rows.append({"id": f"arith-L{level}-{index:04d}", "question": question, "answer": answer,
                         "level": level})
    return rows[:count] if count is not None else rows
