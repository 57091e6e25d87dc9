"""Training and evaluation runner (issue #5): strategy, optimizer and schedule, checkpoints,
Orbit trainer and evaluator, and `run_experiment` tying them together for `train.py`."""
