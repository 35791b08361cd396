"""What llqr costs over its base optimizer: memory, compilation, time per step.

- :mod:`~benchmarks.cost.run`: llqr over Adam (``python -m benchmarks.cost``, ``make bench-cost``);
- :mod:`~benchmarks.cost.horizon`: llqr before SGD-momentum on the long-horizon tasks (``python -m benchmarks.cost.horizon``);
- :mod:`~benchmarks.cost.rho`: one ρ call against one training step (``python -m benchmarks.cost.rho``).
"""
