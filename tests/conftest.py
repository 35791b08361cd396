"""Suite-wide pytest setup: JAX's dtypes per test module, slowest files first.

Dtypes. JAX's default float stays float32 for the whole process: nothing
here, in the test modules or in the docstring examples changes it globally.
A module that needs float64 says so with ``pytestmark = pytest.mark.x64``;
the autouse module fixture :func:`_jax_dtypes` runs every test of that
module inside ``jax.enable_x64(True)``, and every other module inside
``jax.enable_x64(False)``, each undone when the module's tests are done. So
the docstring examples (``pytest --doctest-modules llqr_optax``, which print
dtypes such as ``dtype=float32``) can share a pytest process, and a
pytest-xdist worker, with the float64 modules. A module's fixtures run
inside its dtypes (module fixtures too: autouse ones are set up first), but
code at a module's top level runs at import, outside them: arrays built
there are float32, so the float64 modules build theirs in fixtures or tests.

Order. ``make test`` runs the suite on two pytest-xdist workers, one test
file at a time per worker (``--dist loadfile``), handing out files in
collection order: :data:`SLOW_FIRST`, then the rest. Starting with the
slowest files (each runs a benchmark script, the notebooks or the docs'
blocks end to end) keeps one worker from being left with a long file at the
end while the other idles. pytest-xdist would otherwise re-sort the files by
their number of tests (``--loadscope-reorder``, its default), which put the
many quick unit tests first and the long files wherever their count fell;
:func:`pytest_configure` turns that off. Only the order changes; every test
still runs.

Compiled programs. The suite compiles the same programs many times over: in
the benchmark scripts' runs across seeds and rates, in the subprocesses of the
docs blocks, notebook, parallel and checkpoint tests. JAX's persistent
compilation cache (``JAX_COMPILATION_CACHE_DIR``, inherited by every
subprocess) compiles each once per machine, in ``.pytest_cache/`` unless the
variable is already set. An executable read from the cache is the one XLA
compiled, so no result changes; the cache key holds the program, the JAX and
XLA versions, the flags and the devices.

Compilation effort. Most of the suite's time is XLA compiling small
programs, not running them. The suite adds two flags to ``XLA_FLAGS`` (which
every subprocess, notebook kernel and docs block inherits),
:data:`SUITE_XLA_FLAGS`:

- ``--xla_backend_optimization_level=0``: LLVM skips its optimisation
  passes, which halves the compile time of an llqr step on the CPU, while
  matrix products, convolutions and decompositions still run XLA's
  precompiled kernels;
- ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU emits its fused loops
  with its older elemental emitter instead of lowering each fusion through
  MLIR, which halves compile time again (the training harness's quick run,
  cold: 152 s against 88 s; one program of ``test_safe_training.py``: a
  compile of 9.5 s against 4.9 s; 2026-12-03, beside a benchmark).

Both change only rounding. Every comparison a test makes is between programs
compiled with the same flags, and the rounding is a test of its own: at
level 0 ``llqr(learning_rate=1.0)`` on the Rosenbrock contract target once
stepped to 3e13 between two refits, where level 2 happened to converge; the
fix (``refit_growth="auto"``, a refit when the gradient grows 4×) made it
converge at both. ``make demo``, the benchmarks and ``make docs`` run at
XLA's defaults. A flag that ``XLA_FLAGS`` already names keeps its value
there (``XLA_FLAGS="--xla_backend_optimization_level=2
--xla_cpu_use_fusion_emitters=true" make test`` tests at XLA's defaults).

Quick modes. ``LLQR_QUICK=1``, set here for the whole suite (and so for the
notebook kernels), makes the notebooks run every cell on smaller problems
(fewer steps and batches); the docs build leaves it unset and runs them in
full.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
#: XLA flags for the whole suite (see "Compilation effort" above); a flag that
#: ``XLA_FLAGS`` already names keeps its value there.
SUITE_XLA_FLAGS = {"xla_backend_optimization_level": "0",
                   "xla_cpu_use_fusion_emitters": "false"}
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS")] + [
    f"--{name}={value}" for name, value in SUITE_XLA_FLAGS.items()
    if name not in os.environ.get("XLA_FLAGS", "")]))
os.environ.setdefault("LLQR_QUICK", "1")

import jax  # noqa: E402  (after the cache settings, which JAX reads at import)
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

#: Slowest first, by each file's summed test durations in a cold-cache run
#: of the whole suite on a loaded 2-core CPU (2026-12); the rest keep their
#: order. Longest first keeps the two workers' loads even at the end.
SLOW_FIRST = (
    "test_notebooks.py",
    "test_benchmarks_training.py",
    "test_safe_training.py",
    "test_doc_blocks.py",
    "test_reliability.py",
    "test_quality.py",
    "test_flax.py",
    "test_checkpoint_mesh.py",
    "test_parallel.py",
    "test_fsdp.py",
    "test_contract_targets.py",
    "test_fit_options.py",
    "test_benchmarks_quick.py",
    "test_paper_preset.py",
    "test_multiprocess.py",
    "test_contract.py",
    "test_fitting.py",
    "test_transform.py",
    "test_exact.py",
    "test_safety.py",
    "test_conv_layout.py",
    "test_docs.py",
    "test_sample_map.py",
    "test_geometry.py",
    "test_checkpoint.py",
    "test_fsdp_auto.py",
    "test_loop.py",
    "test_geometry_registry.py",
    "test_peers.py",
)


def pytest_configure(config):
  # --dist loadfile hands out files in SLOW_FIRST's order, not sorted by
  # their number of tests (pytest-xdist's --loadscope-reorder default).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  config.addinivalue_line(
      "markers", "x64: the module's tests run with float64 enabled "
      "(jax.enable_x64(True)); unmarked modules run in float32")
  config.addinivalue_line(
      "markers", "multiprocess: starts several JAX processes joined by "
      "jax.distributed (CPU collectives over gloo, a local TCP port)")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="module")
def _jax_dtypes(request):
  """float64 for the tests of a module marked ``x64``, float32 for others."""
  with jax.enable_x64(request.node.get_closest_marker("x64") is not None):
    yield


@pytest.fixture(scope="module")
def module_float():
  """JAX's default float dtype while a module's fixtures are set up."""
  return jnp.zeros(()).dtype
