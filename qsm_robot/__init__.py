"""qsm-robot: learn a diffusion policy with Q-score matching, export it, serve it."""

__version__ = "0.1.0"
