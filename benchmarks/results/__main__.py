"""``python -m benchmarks.results``: :func:`benchmarks.results.render.main`."""

from benchmarks.results.render import main

if __name__ == "__main__":
  main()
