"""The training benchmark: optimizers tuned and timed side by side on the tasks of :mod:`benchmarks.tasks`.

- :mod:`~benchmarks.training.run`: the harness (``python -m benchmarks.training``), split into
  :mod:`~benchmarks.training.names` (row names and options), :mod:`~benchmarks.training.optimizers`
  (the Runner protocol and the built-ins), :mod:`~benchmarks.training.protocol` (tuning, seeds),
  :mod:`~benchmarks.training.runs` (interleaved runs, summaries) and :mod:`~benchmarks.training.plots`;
- :mod:`~benchmarks.training.peers`: K-FAC and PSGD Kron in the peer environment (``make bench-peers``);
- :mod:`~benchmarks.training.ablation`: the gains study and the batch sweep (``python -m benchmarks.training.ablation``);
- :mod:`~benchmarks.training.safe_sweep`: the safe-fit sweep (``python -m benchmarks.training.safe_sweep``).
"""
