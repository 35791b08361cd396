"""``python -m benchmarks.quality``: :func:`benchmarks.quality.run.main`."""

from benchmarks.quality.run import main

if __name__ == "__main__":
  main()
