"""The approximation-quality study: ρ of llqr's step against the exact step.

- :mod:`~benchmarks.quality.run`: the study (``python -m benchmarks.quality``), split into
  :mod:`~benchmarks.quality.models` (the nets and their layout), :mod:`~benchmarks.quality.kit`
  (dense curvature, exact steps, ρ), :mod:`~benchmarks.quality.baselines` (K-FAC, Adam's diagonal, …),
  :mod:`~benchmarks.quality.study` (one model's tables), :mod:`~benchmarks.quality.trained`
  (the preconditioner training holds) and :mod:`~benchmarks.quality.plots`;
- :mod:`~benchmarks.quality.decomposition`: ρ lever by lever along a run (``python -m benchmarks.quality.decomposition``).
"""
