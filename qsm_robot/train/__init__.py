"""Training: the loop, replay buffer, checkpoints and run logging."""
