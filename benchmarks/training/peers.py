"""Peer optimizers for the training benchmark: K-FAC (kfac-jax) and PSGD Kron.

These run only in the pinned peer environment (``make bench-peers`` builds
``.venv-peers`` from ``benchmarks/peers-requirements.txt``): kfac-jax 0.0.8
fails on JAX >= 0.9 and psgd-jax 0.2.9 fails on optax 0.2.8.

Each peer is ``make(task, lr) -> Runner`` in :data:`PEERS`, with the Runner
protocol of ``benchmarks/training/run.py``::

  init(params, key) -> opt_state
  step(params, opt_state, x, y, key) -> (params, opt_state, loss)

``loss`` is the training loss on ``(x, y)`` at the incoming ``params`` (before
the update), as for every other optimizer of the harness. ``step`` is compiled
already: do not wrap it in ``jax.jit`` (kfac-jax compiles its own step and
must not be traced again).

The task needs ``init(key)``, ``apply(params, x)`` and ``loss_fn(params, x,
y)``, whose loss must be the mean softmax cross-entropy of ``apply``'s logits
against integer labels, over every axis but the last (a classifier's
``(B, C)`` or a language model's ``(B, T, V)``). K-FAC needs the loss
registered with it; :func:`make_kfac` checks that its registered loss equals
``task.loss_fn`` on the first batch, so a task with another loss fails loudly
instead of training a different objective.

K-FAC settings, and why. kfac-jax offers the K-FAC paper's adaptive learning
rate and momentum (a 2-D quadratic-model solve each step) with
Levenberg-Marquardt damping; its documentation warns that they do not work
well on stochastic objectives, and they would make the harness's learning
rate grid meaningless. So ``kfac`` takes the grid's ``lr`` as a fixed learning
rate on the preconditioned gradient, with a fixed momentum
(:data:`KFAC_MOMENTUM`) and a fixed damping (:data:`KFAC_DAMPING`), passed to
every step as traced values (one compilation per task for the whole grid).
The curvature is kfac-jax's default: the GGN by curvature propagation,
Kronecker-factored for the layers its graph matcher recognises (dense and
"repeated dense" over a sequence; norms' scale and shift diagonal; anything
else, 1-D convolutions and embeddings included, a generic diagonal), updated
every step with EMA 0.95, inverses refreshed every 5 steps; no burn-in (the
harness hands the step one batch at a time). ``kfac_adaptive`` is the fully
adaptive variant (``lr`` ignored), with the damping floored at
:data:`KFAC_MIN_DAMPING`; at kfac-jax's default floor it reached NaN on the
MNIST-1D MLP. It is available by name, not in ``make bench-peers``'s set.
Measured on the MNIST-1D MLP (300 steps, batch 128, final full-train loss):
fixed damping 1e-2 with lr 1e-2 reached 0.035 (lr 3e-3: 0.35, 3e-2: 0.81,
0.1: NaN; damping 1e-3 was unstable above lr 3e-3, damping 0.1 slower), and
``kfac_adaptive`` 0.035 as well. Over the harness's 1500 steps, lr 1e-2
drifted up again (final 1.42, no NaN) and 3e-3 was the best rate.

PSGD Kron takes ``psgd_jax.kron``'s defaults (momentum 0.9, preconditioner
update probability annealed from 1 to 0.03, triangular Kronecker factors up to
8192) with the grid's ``lr``.

:data:`PEERS` holds only the peers whose package imports here (none in the
main environment; :data:`UNAVAILABLE` says why), so the harness skips the
others with a note instead of failing.

``python -m benchmarks.training.peers --check`` imports the whole peer stack together
and prints the versions (``make bench-peers`` runs it after installing);
``--registrations TASK`` prints the layers kfac-jax's graph matcher registers
for one of the tasks of ``benchmarks/tasks.py``.
"""

from __future__ import annotations

import argparse
import importlib
import math
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import cross_entropy as mean_cross_entropy
from benchmarks.training.runner import Runner

# Fixed K-FAC damping. The loss is a per-example mean, so the GGN is O(1) per
# example; of 1e-3, 1e-2 and 1e-1 this trained best on the MNIST-1D MLP (see
# the module docstring).
KFAC_DAMPING = 1e-2
KFAC_MOMENTUM = 0.9
# Initial damping of the adaptive variant (kfac-jax adapts it from there).
KFAC_INITIAL_DAMPING = 1.0
# The adaptive damping's floor. At kfac-jax's default (1e-8) the damping fell
# to the floor within 250 MNIST-1D MLP steps and the loss diverged to NaN
# between steps 1250 and 1500; floored at 1e-3 (or 1e-2) it trained stably
# for 3000 steps.
KFAC_MIN_DAMPING = 1e-3


def _peer_import(module: str, package: str, attr: str = ""):
  """``module`` (or its ``attr``), which only the peer environment has."""
  try:
    found = importlib.import_module(module)
    return getattr(found, attr) if attr else found
  except (ImportError, AttributeError) as e:  # pragma: no cover - main env
    raise ImportError(f"{package} is only in the peer environment: run "
                      "`make bench-peers` (builds .venv-peers).") from e


def _import_kfac():
  return _peer_import("kfac_jax", "kfac-jax")


def _import_kron():
  return _peer_import("psgd_jax.kron", "psgd-jax", "kron")


def registered_loss(apply_fn: Callable, params, x, y) -> jax.Array:
  """The mean cross-entropy of ``apply_fn(params, x)``, registered with K-FAC.

  kfac-jax's softmax cross-entropy stands for ``weight · Σ ce / B`` with ``B``
  the batch (first) axis, so a mean over further axes (a sequence's ``T``)
  is reported as ``weight = 1 / T``.
  """
  kfac_jax = _import_kfac()
  logits = apply_fn(params, x)
  per_example = math.prod(logits.shape[1:-1])  # 1 for a (B, C) classifier
  kfac_jax.register_softmax_cross_entropy_loss(
      logits, y, weight=1.0 / per_example)
  return mean_cross_entropy(logits, y)


_CACHE: Dict[Tuple[str, int], Tuple[Any, Any]] = {}


def _per_task(kind: str, task, build: Callable[[], Any]):
  """``build()`` once per (kind, task): one compilation serves the lr grid."""
  key = (kind, id(task))
  hit = _CACHE.get(key)
  if hit is None or hit[0] is not task:  # the task is kept alive with it
    hit = _CACHE[key] = (task, build())
  return hit[1]


def _kfac_optimizer(task, adaptive: bool, **overrides):
  """A ``kfac_jax.Optimizer`` on ``task``'s loss (see the module docstring).

  The fixed variant takes its learning rate, momentum and damping as
  arguments of every ``step`` (traced, so every rate shares one compilation).
  """
  kfac_jax = _import_kfac()
  loss = lambda params, batch: registered_loss(task.apply, params, *batch)
  kwargs = dict(
      value_and_grad_func=jax.value_and_grad(loss),
      l2_reg=0.0,
      num_burnin_steps=0,
      multi_device=False,
  )
  if adaptive:
    kwargs.update(use_adaptive_learning_rate=True,
                  use_adaptive_momentum=True,
                  use_adaptive_damping=True,
                  initial_damping=KFAC_INITIAL_DAMPING,
                  min_damping=KFAC_MIN_DAMPING)
  kwargs.update(overrides)
  return kfac_jax.Optimizer(**kwargs)


def _check_loss(task, params, x, y) -> None:
  """Fails if ``task.loss_fn`` is not the loss registered with K-FAC."""
  ours = float(mean_cross_entropy(task.apply(params, x), y))
  theirs = float(task.loss_fn(params, x, y))
  if not math.isclose(ours, theirs, rel_tol=1e-4, abs_tol=1e-5):
    raise ValueError(
        f"task.loss_fn = {theirs:.6g} but the mean softmax cross-entropy of "
        f"task.apply's logits = {ours:.6g}: K-FAC would register a different "
        "loss than the one trained. Extend benchmarks/training/peers.py for this task.")


def _copy(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


def _make_kfac(task, lr: float, adaptive: bool) -> Runner:
  """K-FAC as a Runner. Its state is created on the first step's batch.

  ``kfac_jax.Optimizer.init`` traces the loss on an example batch to find and
  register the layers, and ``Runner.init`` gets no batch; so ``init`` returns
  a placeholder and the first ``step`` initialises K-FAC on its own batch
  (that step also compiles, so its time is the compile step's anyway).
  kfac-jax donates the params and state it is given. The first ``step``
  copies the params, so that a caller's initial params (the harness's
  initialisation, shared by every run of a seed) stay valid; later steps get
  the params the previous step returned, which the harness never reuses, and
  are not copied (a copy per step cost 0.3 ms, 14% of a K-FAC step, on the
  MNIST-1D MLP).
  """
  opt = _per_task("kfac_adaptive" if adaptive else "kfac", task,
                  lambda: _kfac_optimizer(task, adaptive))
  hyper = {} if adaptive else dict(
      learning_rate=jnp.asarray(lr, jnp.float32),
      momentum=jnp.asarray(KFAC_MOMENTUM, jnp.float32),
      damping=jnp.asarray(KFAC_DAMPING, jnp.float32))

  def init(params, key):
    del params
    return {"kfac": None, "key": key}

  def step(params, opt_state, x, y, key):
    batch = (x, y)
    state = opt_state["kfac"]
    if state is None:
      params = _copy(params)
      _check_loss(task, params, x, y)
      state = opt.init(params, opt_state["key"], batch)
    params, state, stats = opt.step(params, state, key, batch=batch, **hyper)
    return params, {"kfac": state, "key": opt_state["key"]}, stats["loss"]

  return Runner(init=init, step=step)


def make_kfac(task, lr: float) -> Runner:
  """K-FAC (kfac-jax) at a fixed learning rate ``lr``, momentum
  :data:`KFAC_MOMENTUM` and damping :data:`KFAC_DAMPING`."""
  return _make_kfac(task, lr, adaptive=False)


def make_kfac_adaptive(task, lr: float) -> Runner:
  """K-FAC with kfac-jax's adaptive learning rate, momentum and damping,
  the damping floored at :data:`KFAC_MIN_DAMPING` (``lr`` is ignored)."""
  del lr
  return _make_kfac(task, 0.0, adaptive=True)


def _psgd_kron_step(task):
  """``(tx, step(params, state, x, y, lr))``, jitted once per task.

  ``psgd_jax.kron(lr)`` is ``kron(1)`` followed by a scaling by ``lr``
  (``scale_by_learning_rate`` last in its chain; no weight decay here), so
  the rate is applied outside, as a traced scalar: the same numbers, one
  compilation for the whole grid.
  """
  tx = _import_kron()(learning_rate=1.0)

  @jax.jit
  def step(params, opt_state, x, y, lr):
    loss, grads = jax.value_and_grad(task.loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, step


def make_psgd_kron(task, lr: float) -> Runner:
  """PSGD Kron (psgd-jax) with its defaults and learning rate ``lr``."""
  tx, step = _per_task("psgd_kron", task, lambda: _psgd_kron_step(task))
  lr = jnp.asarray(lr, jnp.float32)
  # psgd-jax draws its preconditioner-update coin from its own step count.
  return Runner(init=lambda params, key: tx.init(params),
                step=lambda p, s, x, y, key: step(p, s, x, y, lr))


def _unavailable() -> Dict[str, str]:
  """Why each peer cannot run here (its package does not import), by name."""
  why = {}
  for names, load in ((("kfac", "kfac_adaptive"), _import_kfac),
                      (("psgd_kron",), _import_kron)):
    try:
      load()
    except ImportError as e:  # not installed here; any other failure is raised
      for name in names:
        why[name] = f"{type(e).__name__}: {e}"
  return why


_ALL_PEERS: Dict[str, Callable[[Any, float], Runner]] = {
    "kfac": make_kfac,
    "psgd_kron": make_psgd_kron,
    "kfac_adaptive": make_kfac_adaptive,
}
# The peers whose packages import here; in the main environment (no kfac-jax,
# no psgd-jax) it is empty and the harness skips them with a note.
UNAVAILABLE: Dict[str, str] = _unavailable()
PEERS: Dict[str, Callable[[Any, float], Runner]] = {
    k: v for k, v in _ALL_PEERS.items() if k not in UNAVAILABLE}

# Learning-rate families (``run.py`` tries each at the task's base rate of
# the family times its multipliers). Adam's grid suits both: K-FAC's fixed
# rate on the preconditioned gradient trained best at 3e-3..1e-2 on the
# MNIST-1D MLP (3e-2 was unstable, 0.1 reached NaN), PSGD Kron's at 3e-3.
LR_FAMILY: Dict[str, str] = {"kfac": "adam", "psgd_kron": "adam",
                             "kfac_adaptive": "adam"}


def kfac_registrations(task, params, x, y) -> List[Dict[str, Any]]:
  """The curvature blocks kfac-jax's graph matcher builds for ``task``.

  Returns one dict per block: ``block`` (kfac-jax's block class, e.g.
  ``DenseTwoKroneckerFactored`` for a dense layer, ``ScaleAndShiftDiagonal``
  for a norm's scale/shift, ``NaiveDiagonal`` for a parameter it registered
  only generically), ``name`` (the tag), and the parameter ``shapes``.
  """
  opt = _kfac_optimizer(task, adaptive=False)
  opt.init(params, jax.random.PRNGKey(0), (x, y))
  return [dict(block=type(b).__name__, name=b.name,
               shapes=[tuple(s) for s in b.parameters_shapes])
          for b in opt._estimator.blocks]  # pylint: disable=protected-access


def versions() -> Dict[str, str]:
  """Versions of the peer stack, importing every package together."""
  import chex  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import matplotlib  # pylint: disable=import-outside-toplevel
  import mnist1d  # noqa: F401  pylint: disable=import-outside-toplevel
  from flax import linen  # noqa: F401  pylint: disable=import-outside-toplevel
  from importlib.metadata import version  # pylint: disable=import-outside-toplevel

  import llqr_optax  # noqa: F401  pylint: disable=import-outside-toplevel
  _import_kfac()
  _import_kron()
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "optax": optax.__version__, "flax": flax.__version__,
          "kfac-jax": version("kfac-jax"), "psgd-jax": version("psgd-jax"),
          "chex": chex.__version__, "matplotlib": matplotlib.__version__,
          "mnist1d": version("mnist1d"), "numpy": np.__version__,
          "llqr-optax": version("llqr-optax")}


def _print_registrations(name: str, quick: bool) -> None:
  from benchmarks import tasks  # pylint: disable=import-outside-toplevel
  task = tasks.get_task(name, quick=quick)
  params = task.init(jax.random.PRNGKey(0))
  xs, ys = task.batches(0, 1)
  rows = kfac_registrations(task, params, xs[0], ys[0])
  print(f"{name}: {len(rows)} kfac-jax curvature blocks")
  for row in rows:
    print(f"  {row['block']:32s} {row['name']:36s} {row['shapes']}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="import the peer stack together and print versions")
  parser.add_argument("--registrations", metavar="TASK", nargs="+",
                      help="print kfac-jax's layer registrations for TASKs")
  parser.add_argument("--quick", action="store_true",
                      help="the tasks' quick (tiny) versions")
  args = parser.parse_args(argv)
  if args.check:
    for k, v in versions().items():
      print(f"{k:12s} {v}")
    print("peer stack imports together: ok")
  for name in args.registrations or ():
    _print_registrations(name, args.quick)
  if not (args.check or args.registrations):
    parser.print_help()


if __name__ == "__main__":
  main()
