"""The long-horizon study: llqr before SGD-momentum over a full schedule.

- :mod:`~benchmarks.horizon.run`: the runs and ``--report`` (``python -m benchmarks.horizon``);
- :mod:`~benchmarks.horizon.tasks`: its tasks (MNIST-1D ResNet and CNN, the character Transformer);
- :mod:`~benchmarks.horizon.report`: its tables and plots (``benchmarks/results/long_horizon/``).
"""
