"""Bootstrap (STaR): a model that improves its reasoning from its own correct rationales.

    hints.py     rationalisation: the gold answer as a hint, and when a rationale quotes it
    filter.py    the STaR filter: which sampled rationales to keep, and preference pairs
    data.py      the files: SFT chat JSONL, DPO pairs (TRL's conversational formats), statistics
    rounds.py    one round: sample K rationales per problem through any engine, filter, rationalise
    training.py  `thinktime train sft|dpo|rm`: TRL + peft (full or LoRA), a model folder every engine loads
    loop.py      the whole loop: rounds, fine-tuning, held-out evaluation, the plot
    compare.py   best-of-n with the trained outcome reward model against majority voting, same samples
    plot.py      accuracy per round (PNG)
    commands.py  `thinktime bootstrap` and `thinktime train`

Nothing heavy is imported here: `thinktime --help` imports commands.py.
"""
