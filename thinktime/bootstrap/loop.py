"""The STaR loop: evaluate, sample + filter + rationalise, fine-tune, evaluate again, R times.

    OUT/config.json            the run's settings
    OUT/round-0/eval/          the starting model on the held-out problems (a thinktime eval run folder)
    OUT/round-R/sft.jsonl      SFT rows (chat, with the run's system prompt), pairs.jsonl, stats.json,
                               samples.jsonl (every sample of the round, graded, with and without the hint)
    OUT/round-R/model/         the fine-tuned model (every engine loads it with --model)
    OUT/round-R/eval/          its held-out evaluation
    OUT/summary.json           accuracy (with 95% Wilson interval) and data statistics per round
    OUT/accuracy.png           the plot

Round r samples the training problems with the model of round r-1. Fine-tuning follows STaR
(Zelikman et al., 2022, Algorithm 1) by default: every round trains the *starting* model
(`restart="base"`) on the rationales that round produced (`train_data="round"`; the round's
model solves more problems, so the set grows), so errors do not compound through generations of
fine-tuning. `train_data="all"` trains on the SFT rows of every round so far instead;
`restart="previous"` continues from the last round's model (cheaper per round, drifts more). Held-out problems never enter training: the dataset's last
`eval_problems` are held out, the first `train_problems` are sampled (any question also in the
held-out set is dropped). Rerunning the same command resumes: finished rounds, models and eval
records are reused.

`method="grpo"` replaces sampling and fine-tuning: round r is `grpo_steps` steps of TRL's GRPOTrainer
(thinktime.bootstrap.grpo) from round r-1's model on the same training problems, and the held-out
evaluation uses GRPO's system prompt. OUT/accuracy-time.png plots held-out accuracy against the
training wall time so far (sampling and fine-tuning for STaR), which compares the two methods.
"""
from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from thinktime.bootstrap import data
from thinktime.bootstrap.grpo import GrpoSettings, train_grpo
from thinktime.bootstrap.rounds import RoundSettings, RoundStats, run_round
from thinktime.bootstrap.training import TRAIN_INFO, TrainSettings, train
from thinktime.bootstrap.tree_round import check_round_data, tree_round, tree_settings
from thinktime.errors import BadInputError
from thinktime.evaluation.splits import split_problems, training_split

METHODS = ("star", "grpo")
RESTARTS = ("base", "previous")
TRAIN_DATA = ("round", "all")


@dataclass
class BootstrapConfig:
    model: str
    dataset: str = "arith:2"
    rounds: int = 2
    output: str = "runs/bootstrap"
    engine: str = "transformers"
    train_problems: int = 120
    eval_problems: int = 100
    data_seed: int = 0
    restart: str = "base"
    train_data: str = "round"
    eval_batch: int = 16  # held-out problems per engine call (greedy)
    lang: str = "auto"
    device: str | None = None
    dtype: str | None = None
    train_model: bool = True  # False: sample and write data only (e.g. through a remote server)
    compare_n: int = 0  # > 0: train an ORM on all pairs, compare best-of-N with it against maj@N
    reward_training: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=2.0))
    engine_options: dict = field(default_factory=dict)
    gguf: str | None = None  # write each trained model as a GGUF of this type, so --engine auto samples on llama.cpp
    sampling: RoundSettings = field(default_factory=RoundSettings)
    training: TrainSettings = field(default_factory=TrainSettings)
    method: str = "star"  # grpo: each round is `grpo_steps` GRPO steps from the last round's model
    grpo: GrpoSettings | None = None
    grpo_steps: int = 20
    round_data: str = "star"  # tree: a round's SFT rows and step pairs come from tree search (bootstrap.tree_round)
    tree_iterations: int = 16  # tree: MCTS rounds per problem (steps and rollouts sampled as `sampling` says)
    system_prompt: str | None = None  # None: solve's deep-thinking prompt, for sampling, SFT rows and evaluation

    def to_dict(self) -> dict:
        d = asdict(self)
        d["engine_options"] = {k: v for k, v in self.engine_options.items() if k != "api_key"}
        if self.round_data == "star":  # runs from before the option existed keep their configuration
            d.pop("round_data"), d.pop("tree_iterations")
        if self.system_prompt is None or self.method == "grpo":  # GRPO's settings record it already
            d.pop("system_prompt")
        return d


def _free(engine) -> None:
    if engine is None:
        return
    engine.close()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _evaluate(thinker, heldout, folder: Path, config: BootstrapConfig, log=print) -> dict:
    from thinktime.evaluation.metrics import wilson
    from thinktime.evaluation.runner import Settings, build_config, run_eval
    from thinktime.evaluation.store import RunStore

    settings = Settings(strategy="cot", ns=[1], seed=config.sampling.seed, batch_problems=config.eval_batch)
    with RunStore(folder, build_config(thinker, heldout, settings)) as store:
        count = [len(store.done)]

        def progress(record: dict) -> None:
            count[0] += 1
            if count[0] % config.eval_batch == 0 or count[0] == len(heldout):
                log(f"eval {folder.parent.name}: {count[0]}/{len(heldout)} problems")

        records = run_eval(thinker, heldout, store, settings, on_record=progress)
    correct = sum(bool(r["correct"]) for r in records)
    lo, hi = wilson(correct, len(records))
    return {"correct": correct, "total": len(records), "accuracy": correct / len(records) if records else 0.0,
            "ci": [round(lo, 4), round(hi, 4)],
            "avg_tokens": round(sum(r["completion_tokens"] for r in records) / max(1, len(records)), 1),
            "seconds": round(sum(r["seconds"] for r in records), 1), "folder": str(folder)}


def _check_config(out: Path, config: BootstrapConfig) -> None:
    path = out / "config.json"
    new = config.to_dict()
    if path.is_file():
        old = json.loads(path.read_text())
        # A finished run may get more rounds, or the comparison; the same folder may be named another way.
        keep = {"rounds", "compare_n", "reward_training", "output"}
        diff = sorted(k for k in set(old) | set(new) if k not in keep and old.get(k) != new.get(k))
        if diff:
            raise BadInputError(f"{out} holds a bootstrap run with other settings ({', '.join(diff)})",
                                hint="pass another --output folder, or the same settings to resume it")
    data.write_json(path, new)


def run_bootstrap(config: BootstrapConfig, log=print) -> dict:
    """Run (or resume) the loop; returns the summary written to OUT/summary.json."""
    from thinktime import models

    _check_settings(config)
    out = Path(config.output)
    train_set, heldout = split_problems(config)
    base = str(models.resolve(config.model).path) if config.train_model else config.model
    _check_config(out, config)  # written only once the settings have passed every check
    log(f"bootstrap: {len(train_set)} training problems, {len(heldout)} held out, {config.rounds} rounds -> {out}")
    started = time.perf_counter()
    summary: dict = {"config": config.to_dict(), "rounds": []}
    current = config.model
    compare_records: list[dict] = []
    for r in range(config.rounds + 1):
        entry, engine, thinker = _evaluate_round(config, r, current, heldout, out, log)
        summary["rounds"].append(entry)
        if r == config.rounds:
            if config.compare_n > 0:
                compare_records = _sample_for_comparison(config, engine, heldout, out, r, log)
            _free(engine)
            break
        nxt = out / f"round-{r + 1}"
        if config.method == "grpo":
            _free(engine)
            engine = thinker = None
            current = _grpo_round(config, current, nxt / "model", r + 1, log)
            continue
        if not (nxt / "stats.json").is_file():
            _sample_round(config, engine, thinker, train_set, nxt, r + 1, log)
        _free(engine)
        engine = thinker = None
        if not config.train_model:
            log(f"round {r + 1}: data only (--no-train), the model stays {current}")
            continue
        current = _train_round(config, base, current, out, r + 1, log)
    if config.compare_n > 0 and config.train_model:
        summary["reward_model"] = _reward_model_comparison(config, base, compare_records, out, log)
    return _finish(summary, config, heldout, out, started, log)


def _check_settings(config: BootstrapConfig) -> None:
    """Every setting checked before the run folder records them, and before hours of sampling."""
    if config.restart not in RESTARTS:
        raise BadInputError(f"unknown --from {config.restart!r}", hint="use base (STaR) or previous")
    if config.train_data not in TRAIN_DATA:
        raise BadInputError(f"unknown --train-data {config.train_data!r}", hint="use round (STaR) or all")
    if config.method not in METHODS:
        raise BadInputError(f"unknown --method {config.method!r}", hint="use star or grpo")
    if config.method == "grpo" and (not config.train_model or config.grpo is None or config.grpo_steps < 1):
        raise BadInputError("--method grpo trains every round: it needs training on and --grpo-steps of 1 or more")
    if config.rounds < 0:
        raise BadInputError("--rounds must be at least 0")
    check_round_data(config.round_data, config.method, config.compare_n)
    if config.gguf is not None:
        from thinktime.convert import OUTTYPES

        if config.gguf not in OUTTYPES:
            raise BadInputError(f"unknown --gguf {config.gguf!r}", hint=f"use one of: {', '.join(OUTTYPES)}")
    if config.method == "grpo":
        config.grpo.check()
    elif config.train_model:  # before hours of sampling, not when the first training starts
        config.training.check()
        config.reward_training.check()
    if config.train_model and config.engine.startswith("openai"):
        raise BadInputError("a remote server cannot sample from the models trained here",
                            hint="use --engine transformers or vllm, or --no-train to write the data only")


def _system_prompt(config: BootstrapConfig) -> str | None:
    return config.grpo.system_prompt if config.method == "grpo" else config.system_prompt


def _evaluate_round(config: BootstrapConfig, r: int, current: str, heldout, out: Path, log):
    """Round r's entry (its data and training facts, where on disk) and its model's held-out evaluation;
    returns the entry with the engine and thinker, which the round's sampling goes on with."""
    from thinktime.api import Thinker
    from thinktime.engines import create_engine

    folder = out / f"round-{r}"
    entry: dict = {"round": r, "model": current}
    if r > 0 and (folder / "stats.json").is_file():  # STaR rounds sample data; GRPO rounds sample in training
        entry["data"] = json.loads((folder / "stats.json").read_text())
        info = folder / "model" / TRAIN_INFO
        if info.is_file():
            entry["train"] = {k: v for k, v in json.loads(info.read_text()).items() if k != "settings"}
    engine = create_engine(config.engine, current, device=config.device, dtype=config.dtype, **config.engine_options)
    log(f"round {r}: {current} on the {engine.name} engine" + (
        " (pass --gguf q8_0 to sample trained rounds on llama.cpp)"
        if r and config.engine == "auto" and engine.name == "transformers" and not config.gguf else ""))
    thinker = Thinker(engine=engine, lang=config.lang, max_new_tokens=config.sampling.max_new_tokens,
                      temperature=0.0, seed=config.sampling.seed,
                      system_prompt=_system_prompt(config))
    t = time.perf_counter()
    entry["eval"] = ev = _evaluate(thinker, heldout, folder / "eval", config, log)
    log(f"round {r}: held-out accuracy {ev['correct']}/{ev['total']} = {100 * ev['accuracy']:.1f}% "
        f"(95% CI {100 * ev['ci'][0]:.1f}-{100 * ev['ci'][1]:.1f}%), {time.perf_counter() - t:.0f} s")
    return entry, engine, thinker


def _sample_for_comparison(config: BootstrapConfig, engine, heldout, out: Path, r: int, log) -> list[dict]:
    """N samples per held-out problem from the final model, for best-of-N against maj@N."""
    from thinktime.api import Thinker
    from thinktime.bootstrap.compare import sample_heldout

    t = time.perf_counter()
    sampler = Thinker(engine=engine, lang=config.lang, max_new_tokens=config.sampling.max_new_tokens,
                      temperature=config.sampling.temperature, seed=config.sampling.seed,
                      system_prompt=_system_prompt(config))
    # one folder per final model and N: a run extended by rounds or given another N samples afresh
    samples_dir = out / "compare" / f"samples-round{r}-n{config.compare_n}"
    records = sample_heldout(sampler, heldout, config.compare_n, samples_dir, seed=config.sampling.seed)
    log(f"compare: {config.compare_n} samples per held-out problem, {time.perf_counter() - t:.0f} s")
    return records


def _sample_round(config: BootstrapConfig, engine, thinker, train_set, folder: Path, r: int, log) -> None:
    """STaR round r's data: sample, filter and rationalise the training problems, written into `folder`."""
    t = time.perf_counter()
    if config.round_data == "tree":
        search = tree_settings(config.sampling, config.tree_iterations)
        s = tree_round(thinker, train_set, folder, search, r, config.sampling.keep, log=log)
        log(f"round {r} data (tree search): {s['solved']}/{s['problems']} problems solved, {s['sft_rows']} SFT rows, "
            f"{s['step_pairs']} step pairs, {time.perf_counter() - t:.0f} s")
        return
    done = {"sample": 0, "rationalise": 0}

    def progress(stage: str, k: int) -> None:
        done[stage] += k
        log(f"round {r} {stage}: {done[stage]} problems done")

    result = run_round(engine, thinker.messages, train_set, config.sampling, round_index=r, on_progress=progress)
    data.write_jsonl(folder / "sft.jsonl", result.sft)
    data.write_jsonl(folder / "pairs.jsonl", result.pairs)
    data.write_jsonl(folder / "samples.jsonl", result.sample_rows(train_set))
    data.write_json(folder / "stats.json", result.stats.to_dict())
    s = result.stats
    log(f"round {r} data: {s.correct_samples}/{s.samples} samples correct, {s.kept} kept, "
        f"{s.rationalised} rationalised ({s.rationalised_problems} problems, {s.quoted_hint} quoted the hint), "
        f"{s.pairs} pairs, {time.perf_counter() - t:.0f} s")


def _train_round(config: BootstrapConfig, base: str, current: str, out: Path, r: int, log) -> str:
    """STaR round r's model: SFT on the round's rationales (or every round's), from the base or the last model."""
    model_dir = out / f"round-{r}" / "model"
    if not (model_dir / TRAIN_INFO).is_file():
        rounds_so_far = range(1, r + 1) if config.train_data == "all" else [r]
        files = [out / f"round-{k}" / "sft.jsonl" for k in rounds_so_far]
        if not sum(len(data.read_jsonl(f)) for f in files):
            raise BadInputError(f"round {r} kept no rationale to train on",
                                hint="sample more (--samples), allow more tokens (--max-new-tokens), "
                                     "or pick an easier --dataset level")
        start_from = base if config.restart == "base" else current
        shutil.rmtree(model_dir, ignore_errors=True)  # this run's own folder, left half-written by a crash
        train("sft", start_from, files, model_dir, config.training, log=log)
    _write_gguf(config, model_dir, r, log)
    return str(model_dir)


def _write_gguf(config: BootstrapConfig, model_dir: Path, r: int, log) -> None:
    """With --gguf, the round's model also as a GGUF, so that the next round samples and evaluates on llama.cpp."""
    if config.gguf and not (model_dir / "model.gguf").is_file():
        from thinktime.convert import convert

        log(f"round {r}: writing the model as a {config.gguf} GGUF for llama.cpp")
        convert(model_dir, config.gguf)


def _finish(summary: dict, config: BootstrapConfig, heldout, out: Path, started: float, log) -> dict:
    """The summary's totals written to OUT/summary.json, and the two plots."""
    import resource

    from thinktime.bootstrap.plot import plot_against_time, plot_rounds

    summary["rounds"] = [_fill(e, out) for e in summary["rounds"]]
    elapsed = 0.0
    for entry in summary["rounds"]:  # the x axis of accuracy against training wall time
        elapsed += _training_seconds(entry)
        entry["training_seconds"] = round(elapsed, 1)
    first, last = summary["rounds"][0]["eval"], summary["rounds"][-1]["eval"]
    summary["improvement"] = {
        "from": first["accuracy"], "to": last["accuracy"],
        "above_start_interval": last["accuracy"] > first["ci"][1],
        "intervals_disjoint": last["ci"][0] > first["ci"][1],
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU time of this process (all rounds in it): on shared machines wall time says little
    summary["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    data.write_json(out / "summary.json", summary)
    name = Path(config.model).name if Path(config.model).exists() else config.model
    label = "STaR" if config.method == "star" else "GRPO"
    plot_rounds(summary["rounds"], out / "accuracy.png", title=f"{label} on {heldout.name}: {name}")
    plot_against_time({label: summary["rounds"]}, out / "accuracy-time.png", title=f"{heldout.name}: {name}")
    log(f"bootstrap: {100 * first['accuracy']:.1f}% -> {100 * last['accuracy']:.1f}% held-out accuracy in "
        f"{summary['seconds']:.0f} s; plot: {out / 'accuracy.png'}")
    return summary


def _reward_model_comparison(config: BootstrapConfig, base: str, records: list[dict], out: Path, log) -> dict:
    """Train the outcome reward model on every round's pairs; best-of-N with it against maj@N."""
    from thinktime.bootstrap.compare import compare_reward_model

    rm_dir = out / "reward-model"
    # The rounds this run asked for (a folder extended further before holds more, which are not this run's)
    files = [f for r in range(1, config.rounds + 1) if (f := out / f"round-{r}" / "pairs.jsonl").is_file()
             and data.read_jsonl(f)]
    if not files:
        log("compare: no preference pairs in any round: no reward model to train")
        return {"skipped": "no preference pairs"}
    info = rm_dir / TRAIN_INFO
    if not info.is_file() or sorted(json.loads(info.read_text()).get("data", [])) != sorted(map(str, files)):
        shutil.rmtree(rm_dir, ignore_errors=True)  # half-written by a crash, or trained on fewer rounds' pairs
        train("rm", base, files, rm_dir, config.reward_training, log=log)
    result = compare_reward_model(records, rm_dir, config.compare_n, device=config.device)
    data.write_json(out / "compare" / "result.json", result)
    n = config.compare_n
    log(f"compare at N={n} on {result['problems']} held-out problems: best-of-{n} (ORM) "
        f"{100 * result['best_of_n']['accuracy']:.1f}% vs maj@{n} {100 * result['majority']['accuracy']:.1f}% "
        f"(ORM-weighted {100 * result['weighted']['accuracy']:.1f}%, pass@{n} {100 * result['pass']['accuracy']:.1f}%); "
        f"ORM right where majority wrong: {result['disagreements']['best_of_n']}, the reverse: "
        f"{result['disagreements']['majority']} (sign test p={result['sign_test_p']:.3f})")
    return result


def _grpo_round(config: BootstrapConfig, current: str, model_dir: Path, r: int, log) -> str:
    """`grpo_steps` GRPO steps from the last round's model (an interrupted round resumes from its checkpoints)."""
    from dataclasses import replace

    if not (model_dir / TRAIN_INFO).is_file():
        shutil.rmtree(model_dir, ignore_errors=True)  # half-written by a crash; the checkpoints are beside it
        settings = replace(config.grpo, max_steps=config.grpo_steps, seed=config.grpo.seed + r,  # new problem order
                           dataset=config.dataset, train_problems=config.train_problems, data_seed=config.data_seed,
                           eval_problems=config.eval_problems, max_completion_length=config.sampling.max_new_tokens,
                           lang=config.lang, device=config.device, dtype=config.dtype)  # the run's split and prompt
        train_grpo(current, model_dir, settings, log=log)
    _write_gguf(config, model_dir, r, log)
    return str(model_dir)


def _training_seconds(entry: dict) -> float:
    """Wall time a round spent making its model: sampling and fine-tuning (STaR), GRPO's steps (GRPO)."""
    return float((entry.get("data") or {}).get("seconds", 0.0)) + float((entry.get("train") or {}).get("seconds", 0.0))


def _fill(entry: dict, out: Path) -> dict:
    """Data and training facts for a round entry (rounds trained in this process included)."""
    r = entry["round"]
    if r > 0 and "data" not in entry and (out / f"round-{r}" / "stats.json").is_file():
        entry["data"] = json.loads((out / f"round-{r}" / "stats.json").read_text())
    info = out / f"round-{r}" / "model" / TRAIN_INFO
    if r > 0 and "train" not in entry and info.is_file():
        entry["train"] = {k: v for k, v in json.loads(info.read_text()).items() if k != "settings"}
    return entry


__all__ = ["BootstrapConfig", "RESTARTS", "RoundSettings", "RoundStats", "TrainSettings", "run_bootstrap",
           "split_problems", "training_split"]
