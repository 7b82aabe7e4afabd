"""The learner's hyperparameters and the names they may choose from (no torch: configuration code
validates with them, and TrainConfig takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("vp", "linear", "cosine")
"""Noise schedules (:func:`qsm_robot.qsm.schedules.make_betas`)."""

INITS = ("xavier", "torch")
"""Weight initialisations: ``xavier`` (the reference implementation's: Xavier-uniform weights and zero
biases in every dense layer, Fourier features N(0, 0.2^2)) or ``torch`` (nn.Linear's default)."""


@dataclass(frozen=True)
class QSMConfig:
    """The learner's own hyperparameters; defaults are the card's reference setup.

    Training builds one from its run configuration (``qsm_robot.train.loop.learner_config``).
    """

    # --- networks (card: "Networks") ---
    hidden_dim: int = 512
    """Width of the denoiser trunk and of each critic."""
    num_layers: int = 2
    """Hidden layers in the denoiser trunk and in each critic."""
    time_dim: int = 128
    """Width of the time-embedding MLP c(t)."""
    fourier_dim: int = 64
    """Learnable Fourier features of t."""
    critic_layer_norm: bool = False
    """LayerNorm (with a learnt scale and shift per critic) after every hidden layer of each critic."""
    init: str = "xavier"
    """Weight initialisation, one of :data:`qsm_robot.qsm.hyperparams.INITS`."""
    # --- diffusion (card: "Sampler", "Schedules") ---
    diffusion_steps: int = 5
    """T: steps of the DDPM chain."""
    schedule: str = "vp"
    """Noise schedule, one of :data:`qsm_robot.qsm.hyperparams.SCHEDULES`."""
    temperature: float = 1.0
    """Scale of the noise added at each reverse step."""
    clip_sample: bool = True
    """Clip the action to [-1, 1] after every reverse step."""
    # --- updates (card: "Actor loss", "Critic loss") ---
    q_grad_scale: float = 50.0
    """M_q: the denoiser is regressed onto -M_q * grad_a Q."""
    q_grad_normalize: bool = False
    """Scale-free target: regress onto -M_q * grad_a Q / rms, with rms a running root-mean-square of
    grad_a Q over recent updates, so that M_q does not depend on the task's reward scale."""
    actor_lr: float = 3e-4
    """Denoiser Adam learning rate, cosine-decayed to 0 over actor_lr_decay_steps updates."""
    actor_lr_decay_steps: int = 2_000_000
    """Updates over which the actor learning rate decays."""
    critic_lr: float = 3e-4
    """Critic Adam learning rate."""
    gamma: float = 0.99
    """Discount."""
    tau: float = 0.005
    """Polyak factor of the target critics."""
    target_noise: float = 0.1
    """Std of the noise added to the target action a'."""
    exploration_noise: float = 0.1
    """Std of the noise added to actions with ``act(explore=True)``."""
    seed: int = 0
    """Seed of the learner's generator (sampling in updates and in exploration)."""

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
