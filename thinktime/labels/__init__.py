"""Step labels from Monte Carlo rollouts (Math-Shepherd, OmegaPRM's binary search), their run folder, their noise
(agreement of two labellings) and a scorer's step-level F1 against them (ProcessBench)."""
