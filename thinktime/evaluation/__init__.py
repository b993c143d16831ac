"""Evaluation: benchmarks by name, a resumable runner, two graders, and reports with plots.

    datasets.py  gsm8k, math500, aime24, aime25, cmath, arith (generated): problems with gold answers
    arith.py     the generated arithmetic set, five levels
    grading.py   math-verify and a simple normalised match, side by side
    store.py     the run folder: config hash, crash-safe JSONL records, a writer's lock
    runner.py    the eval loop (sample once at the largest n, or a registry strategy per n)
    metrics.py   Wilson intervals, unbiased pass@k, equal-budget comparison
    report.py    rich tables, markdown, the accuracy-vs-tokens PNG
    progress.py  the live progress bar
    commands.py  `thinktime eval` and `thinktime report`

Nothing heavy is imported here: `thinktime --help` imports commands.py through this package.
"""
