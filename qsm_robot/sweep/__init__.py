"""qsm-sweep: many qsm-train runs (tasks x presets x seeds x overrides) on Ray Tune, and a report.

    grid.py     the sweep spec (SweepSpec, Resources), sweep files, value parsing, validation,
                the trials it expands to and the sweep folder's sweep.json
    runner.py   Ray Tune: the trial function (an ordinary run directory, resumed from its own
                checkpoints after a failure), resources and threads, the one-line progress
    report.py   learning report over any folders of run directories: rliable statistics
                (bootstrap CIs, IQM, performance profiles), markdown, CSV and figures

docs/SWEEP.md describes the commands, the sweep file and the report.
"""
