"""Structure check for thinktime/: import cycles, imports that point up, modules over 400 lines, functions over
60 lines.

Usage: python scripts/check_imports.py [--strict]   (--strict: exit 1 when anything is listed)

Imports inside functions count too: a lazy import still makes the two modules depend on each other.
Cycles are reported between units (a subpackage such as thinktime.engines, or a top-level module such
as thinktime.api), and between modules inside one subpackage. Units sit in LAYERS, bottom first: a unit may
import its own layer and those below it, never one above; a unit in no layer is listed until it is placed.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "thinktime"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# Bottom first. Units named without the "thinktime." prefix; "thinktime" is the package's __init__ (its API).
LAYERS = [
    ("base", {"errors", "types", "answers", "threads", "models", "confidence", "reasoning", "verdicts", "voting",
              "prompts"}),
    ("engines", {"engines"}),
    ("run context", {"run_context", "sampling"}),
    ("scorers", {"scorers"}),
    ("strategies", {"strategies"}),
    ("api", {"api", "thinktime"}),
    ("command helpers", {"cli_common", "cli_views"}),
    ("evaluation and serving", {"evaluation", "server", "convert"}),
    ("ui and training", {"ui", "bootstrap", "labels", "treesearch"}),
    ("command line", {"cli", "__main__"}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_modules() -> dict[str, tuple[Path, ast.Module]]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        modules[module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


def imported_modules(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """The thinktime modules that `name` imports (from-imports of a submodule resolve to it)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("thinktime") and target != name:
                found.add(target)
    return found


def unit(name: str, known: set[str]) -> str:
    """thinktime.engines.fast -> thinktime.engines; thinktime.api -> thinktime.api."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components with more than one member."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def layer_of(unit_name: str) -> int | None:
    short = unit_name.removeprefix("thinktime.")
    return next((i for i, (_, units) in enumerate(LAYERS) if short in units), None)


def upward_imports(unit_graph: dict[str, set[str]], why: dict) -> list[str]:
    """Imports of a unit in a higher layer, and units in no layer (so a new one gets its place)."""
    found = [f"{u}: in no layer (add it to LAYERS in scripts/check_imports.py)"
             for u in sorted(unit_graph) if layer_of(u) is None]
    for a in sorted(unit_graph):
        for b in sorted(unit_graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la:
                found.append(f"{a} ({LAYERS[la][0]}) -> {b} ({LAYERS[lb][0]}): {', '.join(sorted(why[a, b]))}")
    return found


def edges_within(component: list[str], graph: dict[str, set[str]], why: dict) -> list[str]:
    members = set(component)
    return [f"{a} -> {b} ({', '.join(sorted(why[a, b]))})" for a in component for b in sorted(graph[a] & members)]


def check() -> dict[str, list[str]]:
    modules = load_modules()
    known = set(modules)
    module_graph = {name: imported_modules(name, path, tree, known) for name, (path, tree) in modules.items()}

    # Units: a package's __init__ re-exporting its own modules is not a cycle, so edges inside a unit are dropped.
    unit_graph: dict[str, set[str]] = {}
    why: dict[tuple[str, str], set[str]] = {}
    for name, targets in module_graph.items():
        unit_graph.setdefault(unit(name, known), set())
        for target in targets:
            a, b = unit(name, known), unit(target, known)
            if a != b:
                unit_graph[a].add(b)
                why.setdefault((a, b), set()).add(f"{name} -> {target}")
    cycles = [" | ".join(edges_within(c, unit_graph, why)) for c in strongly_connected(unit_graph)]

    # Modules inside one unit: cycles that do not pass through a package __init__ (re-exports).
    inner = {n: {t for t in ts if unit(t, known) == unit(n, known) and modules[t][0].name != "__init__.py"}
             for n, ts in module_graph.items() if modules[n][0].name != "__init__.py"}
    inner_why = {(a, b): {"import"} for a, bs in inner.items() for b in bs}
    cycles += [" | ".join(edges_within(c, inner, inner_why)) for c in strongly_connected(inner)]

    upward = upward_imports(unit_graph, why)

    long_modules, long_functions = [], []
    for name, (path, tree) in sorted(modules.items()):
        rel = path.relative_to(ROOT)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{rel}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    return {"cycles": cycles, "upward": upward, "modules": long_modules, "functions": long_functions}


def main(argv: list[str]) -> int:
    found = check()
    titles = {"cycles": "import cycles", "upward": "imports that point up", "modules": f"modules over {MAX_MODULE_LINES} lines",
              "functions": f"functions over {MAX_FUNCTION_LINES} lines"}
    for key, title in titles.items():
        print(f"{title}: {len(found[key])}")
        for line in found[key]:
            print(f"  {line}")
    return 1 if "--strict" in argv and any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
