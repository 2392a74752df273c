"""Training building blocks: optimizers, LR schedules, losses, expert-load balancing."""
