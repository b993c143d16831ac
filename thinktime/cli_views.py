"""What `thinktime solve` shows while a strategy runs: a live vote table, search progress, the search tree."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree as RichTree

from thinktime.errors import BadInputError
from thinktime.types import Event, Result


def parse_options(pairs: list[str]) -> dict:
    """`--option key=value` pairs as a dict of the texts given (`-o width=4 -o wait=2`): each is read as its
    option's type when checked (strategies.check_options), so a text option keeps "2" as text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"bad strategy option {pair!r}", hint="write KEY=VALUE, e.g. -o width=4")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def vote_table(votes: list[dict], samples: int, n: int) -> Table:
    table = Table(title=f"votes after {samples}/{n} chains", title_justify="left")
    table.add_column("answer")
    table.add_column("votes", justify="right")
    table.add_column("", style="green")
    for row in votes:
        weight = row.get("votes", row.get("weight", 0))
        table.add_row(escape(str(row["answer"])), f"{weight:g}", "█" * int(round(float(weight) * 20 / max(1, n))))
    return table


class StrategyView:
    """Turns progress events into a live display on the error console (stdout keeps the answer)."""

    def __init__(self, console: Console):
        self.console = console
        self.live: Live | None = None
        self.index: int | None = None  # the candidate whose text is streaming

    def delta(self, event: Event) -> None:
        """Streamed text to stdout; a rule between candidates (reflect's attempts)."""
        if self.index is not None and event.index != self.index:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.console.rule(f"attempt {event.index + 1}")
        self.index = event.index
        sys.stdout.write(event.text)
        sys.stdout.flush()

    def show(self, event: Event) -> None:
        data = event.data
        if event.kind != "progress":
            return
        if "votes" in data and "samples" in data:
            table = vote_table(data["votes"], data["samples"], data["n"])
            if self.live is None:
                self.live = Live(table, console=self.console, transient=False, auto_refresh=False)
                self.live.start()
            self.live.update(table, refresh=True)
        elif "scores" in data:  # best-of-n: every chain's score, and which won
            scores = ", ".join("-" if s is None else f"{s:.3f}" for s in data["scores"])
            self.console.print(f"[dim]scores: {escape(scores)}; best: chain {data.get('best', 0) + 1}[/]")
        elif isinstance(data.get("best"), dict):  # beam and mcts: the leading branch
            best = data["best"]
            where = f"depth {data['depth']}" if "depth" in data else f"iteration {data.get('iteration')}"
            last = (best["steps"][-1] if best["steps"] else "").replace("\n", " ")
            score = "-" if best["score"] is None else f"{best['score']:.3f}"
            self.console.print(f"[dim]{where}: best branch (score {score}, {len(best['steps'])} steps): "
                               f"{escape(last[:100])}[/]")
        elif "verdict" in data:
            self.console.print(f"\n[dim]check {data['round']}: {data['verdict']}[/]")
        elif "waits" in data:
            self.console.print(f"[dim] (wait {data['waits']} after {data['thinking_tokens']} thinking tokens)[/]")

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            if not self.console.is_terminal:  # Live ends its last line itself only on a terminal
                self.console.line()
            self.live = None


def print_tree(console: Console, result: Result) -> None:
    """The search tree of a beam or mcts result: each step with its score, pruned and finished marks."""
    nodes = result.details.get("tree")
    if not nodes:
        console.print(f"[yellow]--show-tree: strategy {result.strategy} builds no tree[/] (use beam or mcts)")
        return
    chosen = set()
    if result.details.get("best"):
        node = result.details["best"]["node"]
        while node is not None:
            chosen.add(node)
            node = nodes[node]["parent"]
    branches = {0: RichTree(f"[bold]{result.strategy}[/] search tree ({len(nodes) - 1} steps)")}
    for node in nodes[1:]:
        step = node["step"].replace("\n", " ") or "(end of turn)"
        score = "" if node["score"] is None else f" [cyan]{node['score']:.3f}[/]"
        visits = f" [dim]N={node['visits']} Q={node['value']:.3f}[/]" if "visits" in node else ""
        marks = (" [green]✔[/]" if node["finished"] else "") + (" [red]pruned[/]" if node.get("pruned") else "")
        style = "bold" if node["id"] in chosen else ""
        text = f"[{style}]{escape(step[:90])}[/]" if style else escape(step[:90])
        branches[node["id"]] = branches[node["parent"]].add(f"{text}{score}{visits}{marks}", highlight=False)
    console.print(branches[0])
