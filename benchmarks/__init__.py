"""Speed and learning benchmarks. Run each from the repository root as a module, e.g.
``python -m benchmarks.update_throughput`` or ``python -m benchmarks.learning --preset fast``;
each prints a table and writes its CSV (and figures) to benchmarks/results/."""
