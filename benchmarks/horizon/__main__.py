"""``python -m benchmarks.horizon``: :func:`benchmarks.horizon.run.main`."""

from benchmarks.horizon.run import main

if __name__ == "__main__":
  main()
