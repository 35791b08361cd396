"""llqr's costs at scale, from a model checked against the code.

- :mod:`~benchmarks.scaling.run`: the tables and the checks (``python -m benchmarks.scaling``);
- :mod:`~benchmarks.scaling.model`: the scaling model (state, FLOPs, communication).
"""
