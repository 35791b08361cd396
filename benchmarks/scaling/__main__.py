"""``python -m benchmarks.scaling``: :func:`benchmarks.scaling.run.main`."""

from benchmarks.scaling.run import main

if __name__ == "__main__":
  main()
