"""``python -m benchmarks.cost``: :func:`benchmarks.cost.run.main`."""

from benchmarks.cost.run import main

if __name__ == "__main__":
  main()
