"""The package's import structure (scripts/check_imports.py): no cycles, no import that points up a layer."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_imports.py"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_and_no_upward_imports():
    found = load_checker().check()
    assert found["cycles"] == []
    assert found["upward"] == []


def test_upward_import_and_unplaced_unit_are_reported():
    checker = load_checker()
    graph = {"thinktime.engines": {"thinktime.strategies", "thinktime.types"}, "thinktime.strategies": set(),
             "thinktime.types": set(), "thinktime.newcomer": set()}
    why = {("thinktime.engines", "thinktime.strategies"): {"thinktime.engines.hf -> thinktime.strategies.cot"},
           ("thinktime.engines", "thinktime.types"): {"thinktime.engines.hf -> thinktime.types"}}
    found = checker.upward_imports(graph, why)
    assert found == ["thinktime.newcomer: in no layer (add it to LAYERS in scripts/check_imports.py)",
                     "thinktime.engines (engines) -> thinktime.strategies (strategies): "
                     "thinktime.engines.hf -> thinktime.strategies.cot"]
