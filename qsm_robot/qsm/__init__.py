"""Q-score matching: diffusion schedule and sampler, networks, the learner and the policy."""
