"""Suite-wide pytest setup: the slowest test files are collected first.

``make test`` runs the suite on two pytest-xdist workers, one test file at a
time per worker (``--dist loadfile``), handing out files in collection
order. Starting with the slowest files (each runs a benchmark script, the
notebooks or the README's blocks end to end) keeps one worker from being
left with a long file at the end while the other idles. Only the order
changes; every test still runs.
"""

from __future__ import annotations

#: Slowest first (seconds on a 2-core CPU, 2026-12); the rest keep their order.
SLOW_FIRST = (
    "test_readme.py",
    "test_benchmarks_training.py",
    "test_notebooks.py",
    "test_flax.py",
    "test_benchmarks_quick.py",
    "test_reliability.py",
    "test_parallel.py",
    "test_fitting.py",
)


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
