"""`thinktime bootstrap` and `thinktime train`. Light at import time: the heavy work is imported inside."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import (ApiKeyOpt, BaseUrlOpt, DataParallelOpt, DeviceOpt, DtypeOpt, EngineOpt, ExecutorOpt,
                           LangOpt, ModelOpt, PipelineParallelOpt, SystemPromptOpt, TensorParallelOpt, app,
                           engine_options, err, friendly_errors, out)
from thinktime.errors import BadInputError

EpochsOpt = typer.Option(3.0, "--epochs", help="Training epochs.")
LrOpt = typer.Option(None, "--lr", help="Learning rate (default by method: sft 3e-5 full / 2e-4 LoRA, "
                     "dpo 1e-6 / 5e-6, rm 1e-5 / 1e-4, grpo 1e-5 / 1e-4, prm 2e-5 / 1e-4, ppm 1e-5 / 1e-4).")
BatchOpt = typer.Option(8, "--batch-size", help="Rows per training step (per device).")
AccumOpt = typer.Option(1, "--grad-accum", help="Gradient accumulation steps.")
MaxLenOpt = typer.Option(2048, "--max-length", help="Longest training sequence in tokens (the thinking prompt alone "
                         "is ~500 tokens in English, ~1,300 in Chinese for SmolLM2).")
LoraOpt = typer.Option(False, "--lora/--full", help="LoRA adapters (merged into the saved model) or full fine-tuning.")
LoraROpt = typer.Option(16, "--lora-r", help="LoRA rank.")
DataSeedOpt = typer.Option(0, "--data-seed", help="arith: which generated problems.")

# `thinktime train`'s options beyond the shared ones (most of them grpo's)
MethodArg = typer.Argument(..., help="sft (chat rows), dpo (preference pairs), rm (outcome reward model from "
                           "preference pairs), grpo (RL on a dataset's problems, graded answers as the reward), "
                           "prm (process reward model from step labels) or ppm (step preference model from step "
                           "pairs).")
DataOpt = typer.Option(None, "--data", help="Training JSONL (repeatable): sft.jsonl for sft, pairs.jsonl for dpo "
                       "and rm, step labels (thinktime label) for prm, step pairs for ppm (grpo reads --dataset).")
TrainBatchOpt = typer.Option(None, "--batch-size", help="Rows per training step (per device; default 8); grpo: "
                             "completions per step (default 16).")
MaxStepsOpt = typer.Option(-1, "--max-steps", help="> 0: stop after this many steps (overrides --epochs).")
BetaOpt = typer.Option(None, "--beta", help="KL penalty strength: dpo (default 0.1), grpo (default 0: no reference "
                       "model).")
FullSequenceOpt = typer.Option(False, "--full-sequence", help="sft: loss on the whole chat, not only the assistant "
                               "reply.")
GrpoDatasetOpt = typer.Option("arith:2", "--dataset", "-d", help="grpo: problems with gold answers (arith:LEVEL, "
                              "gsm8k, math500, ... or a .jsonl file); its train split where it has one.")
SplitOpt = typer.Option(None, "--split", help="grpo: train (the default where the set has one); no other split is "
                        "trained on.")
GrpoTrainProblemsOpt = typer.Option(120, "--train-problems", help="grpo: training problems (the first of the set).")
GrpoEvalProblemsOpt = typer.Option(100, "--eval-problems", help="grpo: held out (the last of the set), never "
                                   "trained on, as `thinktime bootstrap` holds them out.")
GenerationsOpt = typer.Option(8, "--num-generations", "-g", help="grpo: completions per problem (the group each "
                              "reward is compared within).")
CompletionLengthOpt = typer.Option(256, "--max-completion-length", help="grpo: new tokens per completion.")
GrpoFormatOpt = typer.Option(0.0, "--format-reward", help="grpo: weight of a reward of 1 for a \\boxed{} answer "
                             "(0: off).")
GrpoLengthOpt = typer.Option(0.0, "--length-penalty", help="grpo: weight of minus the completion's length over "
                             "--max-completion-length (0: off).")
SaveStepsOpt = typer.Option(25, "--save-steps", help="grpo: checkpoint every N steps (rerunning resumes).")
GenerationOpt = typer.Option("auto", "--generation", help="grpo: auto (vLLM on a GPU where installed, else TRL's "
                             "own generation), transformers, vllm, vllm-server.")
VllmServerOpt = typer.Option(None, "--vllm-server", help="grpo: URL of a `trl vllm-serve` server (with "
                             "--generation vllm-server).")

# `thinktime bootstrap`'s options with longer help
DatasetOpt = typer.Option("arith:2", "--dataset", "-d", help="Problems with gold answers: arith:LEVEL, gsm8k, "
                          "math500, ... or a .jsonl file.")
RationaleTokensOpt = typer.Option(320, "--max-new-tokens", help="New tokens per rationale (and per held-out answer).")
RationaliseOpt = typer.Option(True, "--rationalise/--no-rationalise", help="Give failed problems the gold answer "
                              "as a hint and keep rationales that derive it without quoting the hint.")
RestartOpt = typer.Option("base", "--from", help="base: each round fine-tunes the starting model (STaR); previous: "
                          "continue from the last round's model.")
TrainDataOpt = typer.Option("round", "--train-data", help="round: train on the rationales of this round (STaR); "
                            "all: on those of every round so far.")
CompareOpt = typer.Option(0, "--compare-n", help="> 0: after the last round, train an outcome reward model on all "
                          "pairs and compare best-of-N with it against majority voting at N.")
GgufOpt = typer.Option(None, "--gguf", help="Write each trained model as a GGUF of this type (q8_0, f16, bf16) so "
                       "that --engine auto samples its round on llama.cpp.")
BootstrapMethodOpt = typer.Option("star", "--method", help="star: sample, filter, fine-tune each round; grpo: "
                                  "--grpo-steps GRPO steps a round (groups of --samples, --batch-size completions a "
                                  "step, graded answers as the reward).")
GrpoStepsOpt = typer.Option(20, "--grpo-steps", help="grpo: GRPO steps per round (held-out evaluation after each).")
RoundDataOpt = typer.Option("star", "--round-data", help="star: each round samples, filters and rationalises; tree: "
                            "each round searches the training problems with MCTS (rollouts graded against the gold, "
                            "as `thinktime tree-pairs`), trains on the trees' best correct chains, keeps their step "
                            "pairs.")
TreeItersOpt = typer.Option(16, "--tree-iterations", help="--round-data tree: MCTS rounds per problem.")


def _log(message: str) -> None:
    err.print(f"[dim]{message}[/]")


def _default_model(model: Optional[str], device: Optional[str]) -> str:
    if model:
        return model
    from thinktime import models
    from thinktime.engines import cuda_visible

    return models.DEFAULT_GPU_MODEL if cuda_visible() and device != "cpu" else models.DEFAULT_CPU_MODEL


@app.command("train")
def train_command(
    method: str = MethodArg, data: Optional[list[Path]] = DataOpt,
    output: Path = typer.Option(..., "--output", "-o", help="The model folder to write."),
    model: Optional[str] = ModelOpt, epochs: float = EpochsOpt, lr: Optional[float] = LrOpt,
    batch_size: Optional[int] = TrainBatchOpt, grad_accum: int = AccumOpt, max_length: int = MaxLenOpt,
    max_steps: int = MaxStepsOpt, lora: bool = LoraOpt, lora_r: int = LoraROpt, beta: Optional[float] = BetaOpt,
    full_sequence: bool = FullSequenceOpt, dataset: str = GrpoDatasetOpt, split: Optional[str] = SplitOpt,
    train_problems: int = GrpoTrainProblemsOpt, eval_problems: int = GrpoEvalProblemsOpt,
    data_seed: int = DataSeedOpt, num_generations: int = GenerationsOpt,
    max_completion_length: int = CompletionLengthOpt,
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="grpo: sampling temperature."),
    format_reward: float = GrpoFormatOpt, length_penalty: float = GrpoLengthOpt,
    system_prompt: Optional[Path] = SystemPromptOpt, lang: str = LangOpt, save_steps: int = SaveStepsOpt,
    generation: str = GenerationOpt, vllm_server: Optional[str] = VllmServerOpt,
    seed: int = typer.Option(0, "--seed"), device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
) -> None:
    """Fine-tune with TRL (full or LoRA) and write a model folder that every engine loads (--model FOLDER)."""
    with friendly_errors():
        from thinktime.bootstrap.training import METHODS

        if method not in METHODS:
            raise BadInputError(f"unknown training method {method!r}", hint=f"use one of {', '.join(METHODS)}")
        common = {"epochs": epochs, "learning_rate": lr, "grad_accum": grad_accum, "max_length": max_length,
                  "max_steps": max_steps, "lora": lora, "lora_r": lora_r, "lora_alpha": 2 * lora_r, "seed": seed,
                  "device": device, "dtype": dtype}
        if method == "grpo":
            info = _train_grpo(model, output, device, common, batch_size, beta, dataset=dataset, split=split,
                               train_problems=train_problems, eval_problems=eval_problems, data_seed=data_seed,
                               num_generations=num_generations, max_completion_length=max_completion_length,
                               temperature=temperature, format_reward=format_reward, length_penalty=length_penalty,
                               system_prompt=system_prompt, lang=lang, save_steps=save_steps,
                               generation=generation, vllm_server=vllm_server)
        else:
            info = _train_on_files(method, model, data, output, device, common, batch_size, beta, full_sequence)
        _print_trained(method, output, info, system_prompt)


def _train_on_files(method: str, model: Optional[str], data: Optional[list[Path]], output: Path,
                    device: Optional[str], common: dict, batch_size: Optional[int], beta: Optional[float],
                    full_sequence: bool) -> dict:
    """sft, dpo and rm: TRL's trainers over the JSONL files `thinktime bootstrap` wrote."""
    from thinktime.bootstrap.training import TrainSettings, train

    if not data:
        raise BadInputError(f"{method} trains on --data files", hint="pass the sft.jsonl / pairs.jsonl "
                            "files that `thinktime bootstrap` wrote")
    settings = TrainSettings(batch_size=8 if batch_size is None else batch_size,
                             beta=0.1 if beta is None else beta, completion_only=not full_sequence, **common)
    return train(method, _default_model(model, device), data, output, settings, log=_log)


def _print_trained(method: str, output: Path, info: dict, system_prompt: Optional[Path]) -> None:
    out.print(f"[green]model:[/] {output}  ({info['steps']} steps, loss {info['train_loss']}, "
              f"{info['seconds']:.0f} s)")
    if method in ("rm", "prm", "ppm"):
        out.print(f"use it: thinktime solve -s best-of-n --scorer {'orm' if method == 'rm' else 'prm'}:{output} ...")
    else:
        hint = f" --system-prompt {system_prompt}" if method == "grpo" and system_prompt else ""
        out.print(f"use it: thinktime solve --model {output}{hint} ...")


def _train_grpo(model: Optional[str], output: Path, device: Optional[str], common: dict, batch_size: Optional[int],
                beta: Optional[float], system_prompt: Optional[Path], **options) -> dict:
    from thinktime.bootstrap.grpo import GrpoSettings, train_grpo
    from thinktime.prompts import load_system_prompt

    settings = GrpoSettings(batch_size=16 if batch_size is None else batch_size, beta=0.0 if beta is None else beta,
                            system_prompt=load_system_prompt(system_prompt) if system_prompt else None,
                            **common, **options)
    return train_grpo(_default_model(model, device), output, settings, log=_log)


@app.command("bootstrap")
def bootstrap_command(
    model: Optional[str] = ModelOpt, dataset: str = DatasetOpt,
    rounds: int = typer.Option(2, "--rounds", "-r", help="STaR rounds (each: sample, filter, fine-tune, evaluate)."),
    samples: int = typer.Option(4, "--samples", "-k", help="Rationales sampled per training problem per round."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default runs/bootstrap-...)."),
    train_problems: int = typer.Option(120, "--train-problems", help="Training problems (the first of the set)."),
    eval_problems: int = typer.Option(100, "--eval-problems", help="Held-out problems (the last of the set)."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature for rationales."),
    max_new_tokens: int = RationaleTokensOpt,
    keep: int = typer.Option(1, "--keep", help="Distinct correct rationales kept per problem."),
    hint_samples: int = typer.Option(2, "--hint-samples", help="Rationales sampled with the hint per failed problem."),
    rationalise: bool = RationaliseOpt,
    max_pairs: int = typer.Option(2, "--max-pairs", help="Preference pairs per problem."),
    restart: str = RestartOpt, train_data: str = TrainDataOpt,
    epochs: float = EpochsOpt, lr: Optional[float] = LrOpt, batch_size: int = BatchOpt, max_length: int = MaxLenOpt,
    lora: bool = LoraOpt, lora_r: int = LoraROpt, compare_n: int = CompareOpt,
    no_train: bool = typer.Option(False, "--no-train", help="Sample and write the data only (any engine)."),
    gguf: Optional[str] = GgufOpt, seed: int = typer.Option(0, "--seed"), data_seed: int = DataSeedOpt,
    engine: str = EngineOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, lang: str = LangOpt,
    base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt,
    tensor_parallel_size: Optional[int] = TensorParallelOpt, pipeline_parallel_size: Optional[int] = PipelineParallelOpt,
    data_parallel_size: Optional[int] = DataParallelOpt, distributed_executor_backend: Optional[str] = ExecutorOpt,
    method: str = BootstrapMethodOpt, grpo_steps: int = GrpoStepsOpt, round_data: str = RoundDataOpt,
    format_reward: float = typer.Option(0.0, "--format-reward", help="grpo: weight of the \\boxed{} reward."),
    length_penalty: float = typer.Option(0.0, "--length-penalty", help="grpo: weight of the length penalty."),
    system_prompt: Optional[Path] = SystemPromptOpt, tree_iterations: int = TreeItersOpt,
) -> None:
    """STaR or GRPO: the model learns from its own graded answers, round after round; plots held-out accuracy."""
    with friendly_errors():
        from thinktime.bootstrap.grpo import GrpoSettings
        from thinktime.bootstrap.loop import BootstrapConfig, run_bootstrap
        from thinktime.bootstrap.rounds import RoundSettings
        from thinktime.bootstrap.training import TrainSettings
        from thinktime.prompts import load_system_prompt

        _check_bootstrap(samples, keep, max_new_tokens, batch_size, hint_samples, max_pairs, lang, compare_n,
                         no_train, temperature)
        model = _default_model(model, device)
        output = output or _default_run_folder(dataset, model, rounds, samples)
        prompt = load_system_prompt(system_prompt) if system_prompt else None
        trained = dict(batch_size=batch_size, max_length=max_length, lora=lora, lora_r=lora_r, lora_alpha=2 * lora_r,
                       seed=seed, device=device, dtype=dtype)
        config = BootstrapConfig(
            model=model, dataset=dataset, rounds=rounds, output=str(output), engine=engine,
            train_problems=train_problems, eval_problems=eval_problems, data_seed=data_seed, restart=restart,
            train_data=train_data, lang=lang, device=device, dtype=dtype, train_model=not no_train,
            compare_n=compare_n, gguf=gguf, system_prompt=prompt,
            engine_options=engine_options(base_url, api_key, tensor_parallel_size, pipeline_parallel_size,
                                          data_parallel_size, distributed_executor_backend),
            sampling=RoundSettings(samples=samples, temperature=temperature, max_new_tokens=max_new_tokens, keep=keep,
                                   hint_samples=hint_samples, rationalise=rationalise, max_pairs=max_pairs, seed=seed),
            training=TrainSettings(epochs=epochs, learning_rate=lr, **trained),
            reward_training=TrainSettings(epochs=2.0, **trained),
            method=method, grpo_steps=grpo_steps, round_data=round_data, tree_iterations=tree_iterations,
            grpo=GrpoSettings(learning_rate=lr, batch_size=batch_size, lora=lora, lora_r=lora_r, lora_alpha=2 * lora_r,
                              num_generations=samples, temperature=temperature, format_reward=format_reward,
                              length_penalty=length_penalty, seed=seed, system_prompt=prompt),
        )
        summary = run_bootstrap(config, log=_log)
        _print_summary(summary, output)


def _check_bootstrap(samples: int, keep: int, max_new_tokens: int, batch_size: int, hint_samples: int,
                     max_pairs: int, lang: str, compare_n: int, no_train: bool, temperature: float) -> None:
    """bootstrap's settings checked before the run folder records them."""
    for name, value in (("--samples", samples), ("--keep", keep), ("--max-new-tokens", max_new_tokens),
                        ("--batch-size", batch_size), ("--hint-samples", hint_samples)):
        if value < 1:
            raise BadInputError(f"{name} must be at least 1")
    if max_pairs < 0:
        raise BadInputError(f"--max-pairs must be 0 (no preference pairs) or more, got {max_pairs}")
    if lang not in ("auto", "en", "zh"):
        raise BadInputError(f"unknown language {lang!r}", hint="use auto, en or zh")
    if compare_n and no_train:
        raise BadInputError("--compare-n scores the final model's samples with a reward model trained on the "
                            "run's pairs, and --no-train trains nothing", hint="drop one of them")
    if temperature <= 0:
        raise BadInputError("--temperature must be above 0", hint="K greedy samples would all be the same chain")


def _default_run_folder(dataset: str, model: str, rounds: int, samples: int) -> Path:
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}-{Path(model).name}-r{rounds}-k{samples}")
    return Path("runs") / f"bootstrap-{slug}"

@app.command("bootstrap-plot")
def bootstrap_plot_command(
    runs: list[Path] = typer.Argument(..., help="Bootstrap run folders (STaR or GRPO), each with its summary.json."),
    output: Path = typer.Option(Path("accuracy-time.png"), "--output", "-o", help="The PNG to write."),
) -> None:
    """Held-out accuracy against training wall time, one line per bootstrap run, on one plot."""
    with friendly_errors():
        import json

        from thinktime.bootstrap.plot import plot_against_time

        lines = {}
        for run in runs:
            if not (run / "summary.json").is_file():
                raise BadInputError(f"{run} holds no summary.json", hint="pass finished `thinktime bootstrap` folders")
            summary = json.loads((run / "summary.json").read_text())
            method = summary["config"].get("method", "star")
            name = run.name if all(r.name != run.name for r in runs if r != run) else str(run)
            lines[f"{name} ({'GRPO' if method == 'grpo' else 'STaR'})"] = summary["rounds"]
        plot_against_time(lines, output)
        out.print(f"[green]plot:[/] {output}")


def _print_summary(summary: dict, output: Path) -> None:
    from rich.table import Table

    grpo = summary.get("config", {}).get("method") == "grpo"
    table = Table(title=f"{'GRPO' if grpo else 'STaR'} rounds (held-out accuracy, greedy)")
    columns = ("round", "accuracy", "95% CI", "training wall time", "mean reward (last step)") if grpo else \
        ("round", "accuracy", "95% CI", "kept", "rationalised", "pairs", "train samples correct")
    for column in columns:
        table.add_column(column, justify="right")
    for r in summary["rounds"]:
        ev, d = r["eval"], r.get("data") or {}
        head = [str(r["round"]), f"{100 * ev['accuracy']:.1f}% ({ev['correct']}/{ev['total']})",
                f"{100 * ev['ci'][0]:.1f}-{100 * ev['ci'][1]:.1f}%"]
        if grpo:
            rewards = (r.get("train") or {}).get("rewards") or [{}]
            table.add_row(*head, f"{r.get('training_seconds', 0) / 60:.1f} min",
                          f"{rewards[-1]['reward']:.3f}" if "reward" in rewards[-1] else "")
            continue
        table.add_row(*head, str(d.get("kept", "")), str(d.get("rationalised", "")), str(d.get("pairs", "")),
                      f"{100 * d['sample_accuracy']:.1f}%" if d else "")
    out.print(table)
    rm = summary.get("reward_model")
    if rm and "best_of_n" in rm:
        n = rm["n"]
        out.print(f"best-of-{n} with the trained ORM: {100 * rm['best_of_n']['accuracy']:.1f}%  ·  maj@{n}: "
                  f"{100 * rm['majority']['accuracy']:.1f}%  ·  pass@{n}: {100 * rm['pass']['accuracy']:.1f}%")
    out.print(f"[green]summary:[/] {output / 'summary.json'}\n[green]plot:[/]    {output / 'accuracy.png'}, "
              f"{output / 'accuracy-time.png'} (against training wall time)")
