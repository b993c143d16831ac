"""Final answers: extract the last \\boxed{} (or a marked fallback), normalise, compare by math equivalence.

math-verify does the equivalence; its timeouts rely on `signal.alarm`, which only works on the main
thread. Off the main thread (server workers, thread pools) we run it in a child process with a
deadline instead, so hostile LaTeX can never hang the caller.
"""
from __future__ import annotations

import ast
import atexit
import concurrent.futures as cf
import functools
import multiprocessing
import re
import signal
import threading
from dataclasses import dataclass
from typing import Literal

Method = Literal["boxed", "answer-is", "last-number"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class Extraction:
    """An extracted answer and how it was found; anything but 'boxed' is a fallback."""

    value: str | None
    method: Method | None = None
    start: int = -1  # where the answer's evidence starts in the text (for splitting answer from reasoning)

    @property
    def is_fallback(self) -> bool:
        return self.method not in (None, "boxed")


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """The content of the balanced {...} group opening at `open_at`, and the index after it."""
    depth = 0
    for i in range(open_at, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):  # an escaped brace \{ does not count
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
    return None


def find_boxed(text: str) -> list[tuple[int, str]]:
    """Every complete \\boxed{...} / \\fbox{...} in order, as (start index, content)."""
    found: list[tuple[int, str]] = []
    pattern = re.compile(r"\\(?:boxed|fbox)\b\s*")
    for m in pattern.finditer(text):
        after = m.end()
        if after < len(text) and text[after] == "{":
            group = _braced(text, after)
            if group is not None:
                found.append((m.start(), group[0].strip()))
        else:  # `\boxed 5` form: one token up to whitespace or $
            token = re.match(r"[^\s$]+", text[after:])
            if token:
                found.append((m.start(), token.group(0)))
    return found


_ANSWER_IS = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*\$*\s*(?P<ans>[^\n$]+?)\s*\$*\s*(?:\.\s|\.$|\n|$)"
    r"|(?:最终答案|答案)\s*(?:(?:是|为)\s*[：:]?|[：:])\s*\$*\s*(?P<zh>[^\n$。，,]+?)\s*\$*\s*(?:。|，|,|\n|$)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
# "the answer is 12, which is even": the answer ends where a clause begins (a list "1, 2, 3" does not)
_FILLER = re.compile(r"^(?:(?:indeed|clearly|simply|just|exactly|actually|therefore|thus|then|still|now|"
                     r"obviously|definitely|certainly|correct(?:ly)?|probably)\b[\s,:]*)+", re.IGNORECASE)
_CLAUSE = re.compile(r",\s+(?:(?:but|which|so|and|because|since|as|that|while|although|though|or|then|where|if|"
                     r"meaning|not)\b|i\.e\b|e\.g\b)", re.IGNORECASE)


def extract_answer(text: str) -> Extraction:
    """The last \\boxed{} answer; else 'the answer is X' / '答案是X'; else the last number in the text."""
    boxes = find_boxed(text)
    if boxes:
        start, content = boxes[-1]
        return Extraction(content, "boxed", start)
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        m = matches[-1]
        value = (m.group("ans") or m.group("zh") or "").strip().rstrip(".")
        clause = _CLAUSE.search(value)
        if clause:
            value = value[:clause.start()].strip()
        value = _FILLER.sub("", value).strip()  # "the answer is indeed 12": 12
        if value:
            return Extraction(value, "answer-is", m.start())
    numbers = list(_NUMBER.finditer(text))
    if numbers:
        m = numbers[-1]
        return Extraction(m.group(0).rstrip(",").replace(",", ""), "last-number", m.start())
    return Extraction(None)


_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def normalize(answer: str) -> str:
    """A canonical string form for cheap comparison and display (math-verify does the real check)."""
    s = answer.strip()
    s = s.strip("$").strip()
    s = _TEXT_WRAP.sub(r"\1", s)
    s = re.sub(r",\\!\s*", ",", s)  # 11,\! 111,\! 100: a thousands separator, with the space after it
    # An escaped space "\ " is a space; "\\ " (a row break, then a space) is kept: matrices are made of them.
    s = re.sub(r"(?<!\\)\\ ", "", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""),
                     ("\\%", "%"), ("\\$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".。").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 9,765,625 -> 9765625
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*?0+", s):  # 2.50 -> 2.5, 3.0 -> 3
        s = s.rstrip("0").rstrip(".")
    return s


_ARITHMETIC = re.compile(r"[\d\s.+\-*/()]+")


def _as_number(s: str) -> float | None:
    """The value of a number, a fraction, or plain arithmetic on numbers ("10 + 1", "(3*4)/2"); else None.
    Arithmetic is evaluated here because math-verify would do the same through a LaTeX parser and
    sympy: 1-15 ms a pair (0.4 s for the first), paid for every pair of differing answers in a vote."""
    try:
        return float(s)
    except ValueError:
        pass
    if not _ARITHMETIC.fullmatch(s):  # (powers and anything but numbers fail in _evaluate)
        return None
    try:
        return _evaluate(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, OverflowError):
        return None


_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("not plain arithmetic")


def _verify_in_this_thread(a: str, b: str, timeout: int | None) -> bool:
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{a}}}", parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{b}}}", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _worker_pool() -> cf.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # The worker ignores Ctrl-C: the terminal sends it to the whole process group, and the parent,
            # which handles it, shuts the worker down; otherwise the worker prints its own traceback.
            _pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
            atexit.register(_shutdown_pool)
        return _pool


def _shutdown_pool() -> None:
    """At exit, stop the worker before the interpreter tears down the modules its manager uses."""
    with _pool_lock:
        pool = _pool
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill_pool() -> None:
    """A worker that overran its deadline is killed: the next call starts a fresh one."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def math_equal(a: str, b: str, timeout: float = 5.0) -> bool:
    """math-verify equivalence of two answer strings, bounded by `timeout` seconds on any thread."""
    try:
        return _math_equal(a, b, max(1, int(round(timeout))))
    except cf.TimeoutError:
        return False


@functools.lru_cache(maxsize=100_000)  # math-verify is slow, and voting asks the same pairs round after round
def _math_equal(a: str, b: str, seconds: int) -> bool:
    if threading.current_thread() is threading.main_thread():
        try:
            return _verify_in_this_thread(a, b, seconds)
        except Exception:
            return False
    future = _worker_pool().submit(_verify_in_this_thread, a, b, seconds)
    try:
        return bool(future.result(timeout=seconds + 5))
    except cf.TimeoutError:
        _kill_pool()
        raise  # not cached: a busy machine may have been the cause
    except Exception:
        return False


def equivalent(a: str | None, b: str | None, timeout: float = 5.0) -> bool:
    """True when two answers are the same: equal after normalisation, equal as numbers, or math-equal."""
    if a is None or b is None:
        return False
    na, nb = normalize(a), normalize(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    xa, xb = _as_number(na), _as_number(nb)
    if xa is not None and xb is not None:
        if xa.is_integer() and xb.is_integer():  # exact: a relative tolerance would pass 11111111100 for ...101
            return xa == xb
        return abs(xa - xb) <= 1e-9 * max(1.0, abs(xa), abs(xb))
    return math_equal(na, nb, timeout)
