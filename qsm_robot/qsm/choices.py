"""The names a QSM configuration may choose from (no torch: configuration code validates with them)."""

SCHEDULES = ("vp", "linear", "cosine")
"""Noise schedules (:func:`qsm_robot.qsm.schedules.make_betas`)."""

INITS = ("xavier", "torch")
"""Weight initialisations: ``xavier`` (the reference implementation's: Xavier-uniform weights and zero
biases in every dense layer, Fourier features N(0, 0.2^2)) or ``torch`` (nn.Linear's default)."""
