"""A bootstrap round whose data comes from tree search (`--round-data tree`) instead of STaR sampling.

The round's model searches every training problem with `thinktime tree-pairs`'s MCTS (rollouts graded against
the gold answer, thinktime.treesearch); the round trains on the trees' best correct chains, and keeps the trees'
step preference pairs beside them:

    OUT/round-R/tree/              the round's tree-pairs run folder (resumable: config.json, trees.jsonl, ...)
    OUT/round-R/sft.jsonl          the best correct chains, as STaR's SFT rows (kind "tree", round R)
    OUT/round-R/step-pairs.jsonl   step pairs sharing their prefix, the rows `thinktime train ppm` reads
    OUT/round-R/pairs.jsonl        empty: the trees give step pairs, not whole-chain ones
    OUT/round-R/stats.json         the round's counts: STaR's kept (SFT rows), pairs (step pairs) and sample_accuracy
                                   (the share of rollouts that reached the gold), and the tree folder's summary
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from thinktime.bootstrap import data
from thinktime.treesearch.pairs import PairFilter
from thinktime.treesearch.run import TREES, TreeRun, tree_run
from thinktime.treesearch.search import TreeSettings

ROUND_DATA = ("star", "tree")


def tree_settings(sampling, iterations: int) -> TreeSettings:
    """A round's search from its sampling settings (bootstrap.rounds.RoundSettings): steps and rollouts at its
    temperature, rollouts up to its max_new_tokens, its seed."""
    return TreeSettings(iterations=iterations, rollout_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature, seed=sampling.seed)


def tree_round(thinker, problems, folder: Path, search: TreeSettings, round_index: int, keep: int = 1,
               rules: PairFilter = PairFilter(), log=print) -> dict:
    """Search `problems` with `thinker`'s model and write the round's files into `folder`; the round's stats."""
    # each round draws other trees than the last (its own seeds), as STaR rounds draw other samples
    run = TreeRun(dataset="bootstrap training problems", split=None, keep=keep, rules=rules,
                  search=replace(search, seed=search.seed + 100_003 * round_index))
    done = [0]

    def progress(record: dict) -> None:
        done[0] += 1
        log(f"round {round_index} tree search: {done[0]} problems searched ({record['seconds']:.0f} s the last)")

    summary = tree_run(thinker, problems, folder / "tree", run, on_record=progress)
    sft = [{**row, "round": round_index} for row in data.read_jsonl(folder / "tree" / "sft.jsonl")]
    pairs = [{**row, "round": round_index} for row in data.read_jsonl(folder / "tree" / "pairs.jsonl")]
    data.write_jsonl(folder / "sft.jsonl", sft)
    data.write_jsonl(folder / "step-pairs.jsonl", pairs)
    data.write_jsonl(folder / "pairs.jsonl", [])
    outcomes = [o["correct"] for tree in data.read_jsonl(folder / "tree" / TREES) for node in tree["tree"]
                for o in node.get("outcomes", ())]
    # the keys of a STaR round's stats that the summary table and plot read, then the tree's own counts
    stats = {"round": round_index, "data": "tree", "kept": len(sft), "rationalised": 0, "pairs": len(pairs),
             "sample_accuracy": round(sum(outcomes) / len(outcomes), 4) if outcomes else 0.0, **summary,
             "sft_rows": len(sft), "step_pairs": len(pairs), "kept_problems": len({row["id"] for row in sft})}
    data.write_json(folder / "stats.json", stats)
    return stats


def check_round_data(round_data: str, method: str, compare_n: int) -> None:
    """Refuse a round-data setting that cannot work with the rest of a bootstrap run."""
    from thinktime.errors import BadInputError

    if round_data not in ROUND_DATA:
        raise BadInputError(f"unknown --round-data {round_data!r}", hint="use star or tree")
    if round_data == "tree" and method == "grpo":
        raise BadInputError("--round-data tree gives STaR rounds their data; GRPO samples its own",
                            hint="drop --round-data, or use --method star")
    if round_data == "tree" and compare_n:
        raise BadInputError("--compare-n trains an outcome reward model on whole-chain pairs, and tree rounds give "
                            "step pairs (round-R/step-pairs.jsonl, for thinktime train ppm)",
                            hint="drop --compare-n, or use --round-data star")
