"""The demo and its companions on the demo's MNIST-1D MLP.

- :mod:`~benchmarks.demo.run`: the demo (``make demo``, ``python -m benchmarks.demo``);
- :mod:`~benchmarks.demo.sweep`: llqr settings swept on the demo's task (``python -m benchmarks.demo.sweep``);
- :mod:`~benchmarks.demo.long_run`: 10,000-step runs at two learning rates (``python -m benchmarks.demo.long_run``).
"""
