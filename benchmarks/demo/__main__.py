"""``python -m benchmarks.demo``: :func:`benchmarks.demo.run.main`."""

from benchmarks.demo.run import main

if __name__ == "__main__":
  main()
