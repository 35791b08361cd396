"""The benchmarks: a subpackage per study, over a shared layer.

Run from the repository's root as modules, ``python -m benchmarks.<study>``
(the study's ``run.py``; other scripts as ``python -m
benchmarks.<study>.<script>``):

- :mod:`benchmarks.demo`: the demo (``make demo``), the settings sweep, long runs;
- :mod:`benchmarks.quality`: ρ of llqr's step against the exact step, lever by lever;
- :mod:`benchmarks.training`: the training harness, its peers, the gains study;
- :mod:`benchmarks.cost`: what llqr costs over its base optimizer;
- :mod:`benchmarks.scaling`: llqr's costs at scale;
- :mod:`benchmarks.horizon`: the long-horizon study;
- :mod:`benchmarks.results`: ``RESULTS.md`` and the summaries kept in the repository.

The shared layer, which imports no subpackage: :mod:`benchmarks.tasks` (the
training tasks), :mod:`benchmarks.models`, :mod:`benchmarks.datasets`,
:mod:`benchmarks.common` (steps, batches, smoothing), :mod:`benchmarks.cli`,
:mod:`benchmarks.formatting`, :mod:`benchmarks.plotting` and
:mod:`benchmarks.provenance`. The imports form no cycle
(``tests/test_layout.py``).
"""
