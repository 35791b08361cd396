"""``benchmarks/RESULTS.md`` and the results kept in the repository.

- :mod:`~benchmarks.results.render`: writes ``RESULTS.md`` from the JSON files (``python -m benchmarks.results``),
  a section per kind: :mod:`~benchmarks.results.quality`, :mod:`~benchmarks.results.demo` (demo and sweep),
  :mod:`~benchmarks.results.cost`, :mod:`~benchmarks.results.gains` (gains study, batch sweep) and
  :mod:`~benchmarks.results.training`;
- :mod:`~benchmarks.results.slim`: the summaries kept in ``benchmarks/results/data/`` (``python -m benchmarks.results.slim``).

This folder also holds what is kept: ``data/`` (the summaries), the plots ``RESULTS.md``
links, ``long_horizon/`` and ``decomposition/``.
"""
