"""Training: the loop, the optimizer and schedules, checkpoints, metrics."""
