"""``python -m benchmarks.training``: :func:`benchmarks.training.run.main`."""

from benchmarks.training.run import main

if __name__ == "__main__":
  main()
