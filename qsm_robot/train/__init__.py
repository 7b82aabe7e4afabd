"""Training: the loop, replay buffer, evaluation, checkpoints and run logging."""
