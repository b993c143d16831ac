"""Training data from tree search with a known gold answer (rStar-Math style): MCTS whose values come from
rollouts graded against the gold, step-level preference pairs and SFT rows from its trees."""
