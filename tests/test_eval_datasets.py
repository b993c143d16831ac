"""Dataset loaders on the local copies in ../shared/data, the generated arith set, and the run store."""
from __future__ import annotations

import json
import os

import pytest

from thinktime.errors import BadInputError
from thinktime.evaluation import arith
from thinktime.evaluation.datasets import gsm8k_gold, load_dataset, parse_arith_levels
from thinktime.evaluation.store import RECORDS, RunStore, read_records


@pytest.mark.parametrize("name,count,first_gold", [
    ("gsm8k", 1319, "18"),
    ("math500", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("aime24", 30, None),
    ("aime25", 30, "70"),
    ("cmath", 600, "9"),
])
def test_named_sets_load_from_the_local_folder(shared_data, name, count, first_gold):
    data = load_dataset(name, data_dir=shared_data)
    assert len(data) == count
    assert str(shared_data) in data.source
    ids = [p.id for p in data.problems]
    assert len(set(ids)) == count
    assert all(p.question and p.gold for p in data.problems)
    if first_gold is not None:
        assert data.problems[0].gold == first_gold


def test_gold_answers_are_parsed_per_set(shared_data):
    gsm = load_dataset("gsm8k", data_dir=shared_data)
    assert all("####" not in p.gold and "," not in p.gold for p in gsm.problems)
    assert all(p.gold.lstrip("-").replace(".", "").isdigit() for p in gsm.problems)
    assert gsm8k_gold("so 1,234 in all\n#### 1,234") == "1234"
    math500 = load_dataset("math500", data_dir=shared_data)
    assert math500.problems[0].id == "test/precalculus/807.json"
    assert math500.problems[0].meta["level"] == 2
    aime = load_dataset("aime24", data_dir=shared_data)
    assert all(p.gold.isdigit() and 0 <= int(p.gold) <= 999 for p in aime.problems)
    cmath = load_dataset("cmath", data_dir=shared_data)
    assert any("%" in p.gold for p in cmath.problems) and any("/" in p.gold for p in cmath.problems)


def test_the_environment_variable_points_at_the_folder(shared_data, monkeypatch):
    monkeypatch.setenv("THINKTIME_DATA_DIR", str(shared_data))
    assert len(load_dataset("aime25", limit=5)) == 5


def test_limit_keeps_the_first_problems_and_the_fingerprint(shared_data):
    full, some = load_dataset("gsm8k", data_dir=shared_data), load_dataset("gsm8k", data_dir=shared_data, limit=7)
    assert [p.id for p in some.problems] == [p.id for p in full.problems[:7]]
    assert some.fingerprint == full.fingerprint  # --limit is not a different dataset


def test_bad_names_and_folders_get_clear_errors(shared_data, tmp_path):
    with pytest.raises(BadInputError, match="unknown dataset"):
        load_dataset("gsm9k", data_dir=shared_data)
    with pytest.raises(BadInputError, match="not found in") as info:
        load_dataset("math500", data_dir=tmp_path)
    assert "math500_test.jsonl" in info.value.hint
    with pytest.raises(BadInputError, match="no split"):
        load_dataset("aime24", split="train", data_dir=shared_data)
    with pytest.raises(BadInputError):
        load_dataset("gsm8k", data_dir=shared_data, limit=0)
    # a folder with only gsm8k.jsonl (the test split) has no train split: it is never read as one
    (tmp_path / "gsm8k.jsonl").write_text((shared_data / "gsm8k_test.jsonl").read_text().splitlines()[0] + "\n")
    assert len(load_dataset("gsm8k", data_dir=tmp_path)) == 1
    with pytest.raises(BadInputError, match=r"gsm8k \(train\) not found"):
        load_dataset("gsm8k", split="train", data_dir=tmp_path)


def test_custom_jsonl_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"problem": "2+2?", "solution": "so \\\\boxed{4}"}\n')
    data = load_dataset(str(path))
    assert [p.gold for p in data.problems] == ["2", "4"]
    path.write_text('{"question": "1+1?", "answer": null, "gold": "2"}\n')  # a null answer beside a gold
    assert [p.gold for p in load_dataset(str(path)).problems] == ["2"]
    path.write_text('{"question": "1+1?"}\n')
    with pytest.raises(BadInputError, match="no gold answer"):
        load_dataset(str(path))


def test_arith_is_seeded_and_leveled():
    one = load_dataset("arith:1")
    assert len(one) == arith.DEFAULT_COUNT
    assert [p.question for p in one.problems] == [p.question for p in load_dataset("arith:1").problems]
    assert one.fingerprint != load_dataset("arith:1", data_seed=1).fingerprint
    for p in one.problems:  # one-digit sums
        a, b = p.question.removeprefix("What is ").rstrip("?").split(" + ")
        assert int(a) + int(b) == int(p.gold) and 1 <= int(a) <= 9 and 1 <= int(b) <= 9
    mixed = load_dataset("arith", limit=10)
    assert sorted({p.meta["level"] for p in mixed.problems}) == [1, 2, 3, 4, 5]
    # the generator's answers are right, word problems included
    for level in (3, 4):
        for p in load_dataset(f"arith:{level}", limit=20).problems:
            expression = p.question.removeprefix("What is ").removeprefix("Compute ").rstrip("?.")
            assert eval(expression, {"__builtins__": {}}) == int(p.gold)  # noqa: S307 (our own generated text)
    words = load_dataset("arith:5", limit=30).problems
    assert all(int(p.gold) > 0 and len(p.question) > 60 for p in words)
    assert parse_arith_levels("arith:1-3") == (1, 2, 3) and parse_arith_levels("arith:2,4") == (2, 4)
    with pytest.raises(BadInputError):
        parse_arith_levels("arith:7")
    with pytest.raises(BadInputError):  # a reversed range is an error, not silently nothing
        parse_arith_levels("arith:3-1,2")


# --- the run store ---------------------------------------------------------------------------------

CONFIG = {"model": "m", "dataset": "arith:1", "n": [1]}


def test_store_appends_resumes_and_skips_duplicates(tmp_path):
    with RunStore(tmp_path, CONFIG) as store:
        store.append({"id": "a", "correct": True})
        store.append({"id": "b", "correct": False})
        store.append({"id": "a", "correct": False})  # a duplicate is never written
    with RunStore(tmp_path, CONFIG) as store:
        assert store.done == {"a", "b"}
        store.append({"id": "c", "correct": True})
    lines = (tmp_path / RECORDS).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]


def test_store_cuts_a_line_torn_by_a_crash(tmp_path):
    with RunStore(tmp_path, CONFIG) as store:
        store.append({"id": "a"})
    with open(tmp_path / RECORDS, "ab") as f:
        f.write(b'{"id": "b", "corr')  # what kill -9 in the middle of a write could leave
    assert [r["id"] for r in read_records(tmp_path)] == ["a"]
    with RunStore(tmp_path, CONFIG) as store:
        assert store.done == {"a"}
        store.append({"id": "b"})
    assert [r["id"] for r in read_records(tmp_path)] == ["a", "b"]
    assert (tmp_path / RECORDS).read_bytes().endswith(b"\n")


def test_store_refuses_a_changed_configuration(tmp_path):
    with RunStore(tmp_path, CONFIG) as store:
        store.append({"id": "a"})
    with pytest.raises(BadInputError, match="different configuration") as info:
        RunStore(tmp_path, {**CONFIG, "n": [1, 4]}).open()
    assert "n: [1] -> [1, 4]" in info.value.message and "--output" in info.value.hint
    with RunStore(tmp_path, CONFIG) as store:  # the old run is intact and still opens
        assert store.done == {"a"}


def test_store_refuses_a_second_writer(tmp_path):
    with RunStore(tmp_path, CONFIG):
        with pytest.raises(BadInputError, match="another thinktime eval"):
            RunStore(tmp_path, CONFIG).open()
    with RunStore(tmp_path, CONFIG):  # released on close
        pass


def test_store_reports_a_damaged_middle_line(tmp_path):
    with RunStore(tmp_path, CONFIG) as store:
        store.append({"id": "a"})
    with open(tmp_path / RECORDS, "ab") as f:
        f.write(b"garbage\n")
        f.write(b'{"id": "c"}\n')
    with pytest.raises(BadInputError, match="line 2 is damaged"):
        read_records(tmp_path)
    os.remove(tmp_path / RECORDS)
