"""Training benchmark: llqr against optax's optimizers (and peers) on three tasks.

One harness for every optimizer, on the tasks of ``benchmarks/tasks.py``
(MNIST-1D MLP, MNIST-1D ResNet, character-level Transformer LM)::

  .venv/bin/python benchmarks/training.py                  # the full run
  .venv/bin/python benchmarks/training.py --quick          # seconds per task
  .venv/bin/python benchmarks/training.py --tasks mnist1d_mlp \\
      --optimizers adam llqr_diag+adam --seeds 0 1 2 --steps 500

Protocol
  *Learning rates.* Every optimizer belongs to a family (``adam``: Adam, AdamW,
  Muon, Sophia, llqr wrapping Adam/AdamW, and peers unless they say
  otherwise; ``sgd``: SGD-momentum and llqr wrapping it). Each task sets a
  base rate per family (``Task.base_lrs``; MNIST-1D: adam 1e-2, sgd 3e-2;
  Transformer: adam 1e-2, sgd 0.3) and every optimizer of the family is
  tried at the base rate times ``--lr-mults`` (default 0.3, 1, 3: e.g.
  3e-3, 1e-2, 3e-2). ``--lrs`` replaces the grid by absolute rates for
  every optimizer. The grid runs on the first seed; the rate with the lowest
  final training loss (the loss on a fixed subset of the training data after
  the last step) is then run on the other seeds. Exception, for time: on the
  ResNet and the Transformer, llqr's refits are expensive on CPU, so there
  llqr is not tuned but runs at its base optimizer's base rate, and the
  ResNet runs only two llqr variants (``TASK_OPTIMIZERS``,
  ``UNTUNED_LLQR_TASKS``; ``--tune-all`` or an explicit ``--optimizers``
  lift this).
  *Same start, same data.* For a seed, every optimizer starts from the same
  parameters (``Task.init(PRNGKey(seed))``) and sees the same batches
  (``Task.batches(seed, steps)``).
  *Interleaving.* All runs of one seed (the whole grid on the first seed)
  advance together, in blocks of ``--block`` steps, the order of the runs
  rotating each block, so that the machine's load is shared by all of them
  and the time ratios compare like with like.
  *Timing.* Each step is timed from the call to the end of
  ``block_until_ready`` on its outputs; batches are on the device before the
  clock starts. ``ms/step median`` and ``mean`` (amortised: llqr's refits
  included) exclude the first step, which compiles; the ratio over Adam is
  taken within the same group of interleaved runs (per seed), and the median
  over seeds is reported. Built-in optimizers take the learning rate as a
  traced argument, so one compilation per (task, optimizer) serves the grid;
  ``compile`` is the first step's time in the first run that used it.
  *Target.* ``Task.target_loss`` is compared with the bias-corrected EMA
  (β = 0.98) of the batch training loss; "steps to target" is the first step
  at which it is reached, "seconds to target" the summed step times up to it
  (the first step counted at the run's median step time, compilation out).

Optimizers (``--optimizers``)
  ``adam``, ``adamw`` (weight decay 1e-4), ``sgd_momentum`` (momentum 0.9),
  ``muon`` (``optax.contrib.muon``, ``consistent_rms=0.2`` so its rates are
  Adam's; Newton-Schulz on the hidden Dense kernels and on conv kernels
  flattened to ``(k·c_in, c_out)``; Adam on biases, norms, embeddings,
  positions and the output head), ``sophia`` (``optax.contrib.sophia``,
  Sophia-H: Hutchinson Hessian-diagonal estimates every 10 steps from the
  batch's loss), and llqr with llqr's defaults: ``llqr_<geometry>_<structure>
  +<base>`` with geometry one of llqr's (default ``ggn`` when left out),
  structure ``diag``/``diagonal``, ``kron``/``kronecker``, ``ekfac``,
  ``scalar``, ``dense`` or ``auto``, and base ``adam``, ``adamw``,
  ``sgd_momentum``; e.g. ``llqr_diag+adam``, ``llqr_fisher_diag+adam``,
  ``llqr_kron+sgd_momentum``. Any other name is looked up in
  ``benchmarks/peers.py`` (``PEERS[name](task, lr) -> Runner``; optional
  ``LR_FAMILY[name]``). An optimizer that cannot be built here (missing
  module, old optax) is skipped with a note, recorded in the JSON.

Writes ``training_<tag>.json`` and ``training_<tag>_<task>.png`` (loss against
steps and against wall-clock: median over seeds, band min–max, each optimizer
at its best rate) to ``--out`` (default ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `python benchmarks/training.py` from anywhere
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import tasks as tasks_lib  # noqa: E402
from benchmarks import provenance as provenance_lib  # noqa: E402

Params = Any
OptState = Any

DEFAULT_OPTIMIZERS = ("adam", "adamw", "sgd_momentum", "muon", "sophia",
                      "llqr_diag+adam", "llqr_kron+adam", "llqr_diag+sgd_momentum",
                      "llqr_fisher_diag+adam")
# llqr's refits are expensive on CPU for the ResNet and the Transformer
# (seconds each on the shared 2-core machine): by default those tasks run
# fewer llqr variants, and llqr is not tuned there but takes its base
# optimizer's base rate (the middle of the grid); ``--tune-all`` and an
# explicit ``--optimizers`` lift this.
TASK_OPTIMIZERS = {
    "mnist1d_resnet": ("adam", "adamw", "sgd_momentum", "muon", "sophia",
                       "llqr_diag+adam", "llqr_kron+adam"),
}
UNTUNED_LLQR_TASKS = ("mnist1d_resnet", "char_transformer")
LR_MULTS = (0.3, 1.0, 3.0)
SMOOTH_BETA = 0.98
STOP_AFTER_NONFINITE = 10  # a run stops after this many non-finite losses
STRUCTURE_ALIASES = {"diag": "diagonal", "kron": "kronecker"}


class Runner(NamedTuple):
  """How the harness drives one optimizer at one learning rate on one task.

  ``init(params, key) -> opt_state``; ``step(params, opt_state, x, y, key) ->
  (params, opt_state, loss)``, already jitted, ``loss`` the batch's mean
  training loss *before* the update (``Task.loss_fn``). ``key`` is a fresh
  PRNG key per step, for optimizers that sample.
  """

  init: Callable[[Params, jax.Array], OptState]
  step: Callable[[Params, OptState, jax.Array, jax.Array, jax.Array],
                 Tuple[Params, OptState, jax.Array]]


class Unavailable(Exception):
  """The optimizer cannot be built in this environment (skipped, not failed)."""


# --------------------------------------------------------------------------
# Built-in optimizers: ``tx(lr)`` with the rate as a traced scalar.


@dataclasses.dataclass(frozen=True)
class Builtin:
  """A built-in optimizer: ``make(lr, loss)`` builds its optax transform.

  ``loss`` is the task's loss as an llqr loss name (llqr and the exact step
  need it). ``extra`` says what ``update`` needs besides the gradient:
  ``"llqr"`` (``apply_fn`` and ``targets``), ``"obj_fn"`` (Sophia's loss) or
  ``"exact"`` (the gradient is first replaced by the exact damped step's
  preconditioned gradient, ``exact`` holding its options).
  """

  family: str
  make: Callable[[Any, str], optax.GradientTransformation]
  extra: str = "none"
  exact: Optional[Dict[str, Any]] = None
  options: Optional[Dict[str, Any]] = None


def _muon_dims(params: Params):
  """Muon on hidden weight matrices (conv kernels flattened over all but the
  output axis); ``None`` (Adam) for vectors, embeddings and the head."""
  from optax.contrib import MuonDimensionNumbers

  def spec(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if names[-1] != "kernel" or "head" in names or np.ndim(leaf) < 2:
      return None
    nd = np.ndim(leaf)
    return MuonDimensionNumbers(reduction_axis=tuple(range(nd - 1)),
                                output_axis=nd - 1)

  return jax.tree_util.tree_map_with_path(spec, params)


def _muon(lr):
  muon = getattr(getattr(optax, "contrib", None), "muon", None)
  if muon is None or not hasattr(optax.contrib, "MuonDimensionNumbers"):
    raise Unavailable(f"optax {optax.__version__} has no optax.contrib.muon "
                      "with MuonDimensionNumbers")
  return muon(lr, consistent_rms=0.2, muon_weight_dimension_numbers=_muon_dims)


def _base(name: str):
  """The base optimizer of a chain, with its family."""
  if name == "adam":
    return "adam", optax.adam
  if name == "adamw":
    return "adam", lambda lr: optax.adamw(lr, weight_decay=1e-4)
  if name in ("sgd_momentum", "sgd"):
    return "sgd", lambda lr: optax.sgd(lr, momentum=0.9)
  if name == "muon":
    _muon(1.0)  # Unavailable here if this optax has no Muon
    return "adam", _muon
  raise Unavailable(f"unknown base optimizer {name!r} (adam, adamw, "
                    "sgd_momentum, muon)")


def parse_options(text: str) -> Dict[str, Any]:
  """``"damping=0.1,structure='kronecker'"`` → keyword arguments.

  Values are Python literals; a bare word is a string
  (``structure=kronecker``).
  """
  import ast
  out: Dict[str, Any] = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not key.strip().isidentifier():
      raise Unavailable(f"option {item!r} is not key=value")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def split_options(name: str) -> Tuple[str, Dict[str, Any]]:
  """``"llqr_kron[damping=0.1]+adam"`` → ``("llqr_kron+adam", {...})``."""
  m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](\+[a-z_]+)?", name)
  if not m:
    return name, {}
  head, opts, tail = m.groups()
  return head + (tail or ""), parse_options(opts)


def parse_llqr(name: str) -> Optional[Tuple[str, str, str]]:
  """``llqr[_<geometry>][_<structure>][opts]+<base>`` → ``(geometry, structure,
  base)``; options in brackets are read by :func:`split_options`.

  The geometry may be left out (``ggn``), and so may the structure (llqr's
  default); ``None`` if ``name`` is not llqr.
  """
  plain, _ = split_options(name)
  m = re.fullmatch(r"llqr(_[a-z_]+)?\+([a-z_]+)", plain)
  if not m:
    return None
  body, base = m.groups()
  body = (body or "")[1:]
  head, _, tail = body.rpartition("_")
  if not body:
    return "ggn", "", base
  structure = STRUCTURE_ALIASES.get(tail, tail)
  import llqr_optax
  if structure in llqr_optax.GEOMETRIES and not head:
    return structure, "", base  # llqr_fisher+adam: a geometry, default structure
  geometry = head or "ggn"
  return geometry, structure, base


def builtin(name: str) -> Builtin:
  """The built-in optimizer called ``name``; ``Unavailable`` if it cannot be
  built here, ``KeyError`` if the name is not a built-in."""
  plain, opts = split_options(name)
  if plain in ("adam", "adamw", "sgd_momentum") and not opts:
    family, make = _base(name)
    return Builtin(family, lambda lr, loss: make(lr))
  if plain == "muon" and not opts:
    _muon(1.0)
    return Builtin("adam", lambda lr, loss: _muon(lr))
  if plain == "sophia" and not opts:
    sophia = getattr(getattr(optax, "contrib", None), "sophia", None)
    if sophia is None:
      raise Unavailable(f"optax {optax.__version__} has no optax.contrib.sophia")
    return Builtin("adam", lambda lr, loss: sophia(lr), extra="obj_fn")
  m = re.fullmatch(r"exact_(ggn|fisher|newton)\+([a-z_]+)", plain)
  if m:
    geometry, base = m.groups()
    family, make_base = _base(base)
    exact = dict(geometry=geometry, damping=1e-2, iters=20)
    unknown = set(opts) - set(exact)
    if unknown:
      raise Unavailable(f"{name}: unknown options {sorted(unknown)} "
                        f"(exact takes {sorted(exact)})")
    exact.update(opts)
    return Builtin(family, lambda lr, loss: make_base(lr), extra="exact",
                   exact=exact)
  parsed = parse_llqr(name)
  if parsed is None:
    raise KeyError(name)
  geometry, structure, base = parsed
  try:
    import llqr_optax
  except Exception as e:  # noqa: BLE001 - any import failure: skip
    raise Unavailable(f"llqr_optax does not import: {e}") from e
  if geometry not in llqr_optax.GEOMETRIES:
    raise Unavailable(f"{name}: unknown geometry {geometry!r}; choose from "
                      f"{list(llqr_optax.GEOMETRIES)}")
  if structure and structure != "auto" and structure not in llqr_optax.STRUCTURES:
    raise Unavailable(f"{name}: unknown structure {structure!r}; choose from "
                      f"{['auto', *STRUCTURE_ALIASES, *llqr_optax.STRUCTURES]}")
  family, make_base = _base(base)
  kwargs = dict(opts)
  compose = kwargs.pop("compose", "before")
  kwargs.setdefault("geometry", geometry)
  if structure:
    kwargs.setdefault("structure", structure)
  if compose == "before":  # optax.chain(llqr(...), base): U(g) into the base
    make = lambda lr, loss: optax.chain(llqr_optax.llqr(loss=loss, **kwargs),
                                        make_base(lr))
  elif compose == "around":  # U applied to the base's update
    make = lambda lr, loss: llqr_optax.precondition_base(make_base(lr), loss=loss,
                                                         **kwargs)
  else:
    raise Unavailable(f"{name}: compose={compose!r} is not 'before' or 'around'")
  try:  # a bad option fails here, before any run
    make(1.0, "softmax_cross_entropy")
  except (TypeError, ValueError) as e:
    raise Unavailable(f"{name}: {e}") from e
  return Builtin(family, make, extra="llqr", options=kwargs)


def exact_gradient(task: tasks_lib.Task, params, x, y, exact: Dict[str, Any]):
  """``(C + λI)⁻¹ g`` by ``iters`` CG steps from zero (the exact damped step,
  negated).

  CG is unrolled in Python rather than run by ``jax.scipy.sparse.linalg.cg``
  (a ``while_loop``): XLA:CPU runs convolutions inside a loop body many times
  slower, which priced the ResNet's ceiling out of a session. It is the same
  iteration without the tolerance stop; a step with ``pᵀAp = 0`` (converged)
  leaves the iterate unchanged.
  """
  import llqr_optax
  from jax.flatten_util import ravel_pytree
  apply_fn = lambda p: task.apply(p, x)
  g = jax.grad(lambda p: task.loss_fn(p, x, y))(params)
  product = llqr_optax.geometry.curvature_product(
      apply_fn, params, y, loss=task.loss, geometry=exact["geometry"],
      damping=exact["damping"])
  b, unravel = ravel_pytree(g)
  matvec = lambda v: ravel_pytree(product(unravel(v)))[0]
  z = jnp.zeros_like(b)
  r, d = b, b
  rr = jnp.vdot(r, r)
  for _ in range(int(exact["iters"])):
    ad = matvec(d)
    dad = jnp.vdot(d, ad)
    alpha = jnp.where(dad > 0, rr / jnp.where(dad > 0, dad, 1.0), 0.0)
    z = z + alpha * d
    r = r - alpha * ad
    rr_new = jnp.vdot(r, r)
    d = r + jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0) * d
    rr = rr_new
  return unravel(z)


def builtin_step(task: tasks_lib.Task, opt: Builtin):
  """``(init, step)`` with ``step(params, state, x, y, key, lr)`` jitted once."""

  def step(params, opt_state, x, y, key, lr, refit=None):
    del key  # llqr and Sophia carry their own PRNG state
    tx = opt.make(lr, task.loss)
    apply_fn = lambda p: task.apply(p, x)
    loss_of = lambda p: task.loss_fn(p, x, y)
    loss, grads = jax.value_and_grad(loss_of)(params)
    extra = {}
    if opt.extra == "llqr":
      extra = dict(apply_fn=apply_fn, targets=y, refit=refit)
    elif opt.extra == "obj_fn":
      extra = dict(obj_fn=loss_of)
    elif opt.extra == "exact":
      grads = exact_gradient(task, params, x, y, opt.exact)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  init = lambda params, key: opt.make(1.0, task.loss).init(params)
  if opt.extra != "llqr":
    return init, jax.jit(step)
  # llqr: two compiled steps, refit or not, picked on the host by llqr's
  # schedule (no lax.cond: XLA:CPU runs convolutions in one many times slower,
  # and GPUs sync on its predicate). The step count is read from the state,
  # which the harness has waited for anyway.
  import llqr_optax
  jitted = jax.jit(step, static_argnames="refit")
  refit_every = _refit_every(opt)

  def llqr_step(params, opt_state, x, y, key, lr):
    count = int(llqr_optax.find_state(opt_state).count)
    if count == 0:  # compile the ordinary step too, inside the first step's time
      jax.block_until_ready(jitted(params, opt_state, x, y, key, lr, refit=False))
    return jitted(params, opt_state, x, y, key, lr,
                  refit=llqr_optax.refit_due(count, refit_every))
  return init, llqr_step


def _refit_every(opt: Builtin) -> int:
  """The llqr transform's refit period (its ``refit_every`` argument)."""
  import inspect
  import llqr_optax
  default = inspect.signature(llqr_optax.scale_by_llqr).parameters["refit_every"].default
  return int((opt.options or {}).get("refit_every", default))


class Optimizers:
  """Builds and caches runners: built-ins, then ``benchmarks.peers``."""

  def __init__(self):
    self._steps: Dict[Tuple[str, str], Tuple[Callable, Callable]] = {}
    self._peers = None
    self._peers_error: Optional[str] = None

  def peers(self):
    if self._peers is None and self._peers_error is None:
      try:
        from benchmarks import peers  # written separately; may be missing
        self._peers = peers
      except Exception as e:  # noqa: BLE001 - missing or broken: skip peers
        self._peers_error = f"{type(e).__name__}: {e}"
    return self._peers

  def family(self, name: str) -> str:
    """The learning-rate family of ``name``; raises ``Unavailable``."""
    try:
      return builtin(name).family
    except KeyError:
      pass
    peers = self.peers()
    if peers is None:
      raise Unavailable(f"not a built-in, and benchmarks.peers does not import "
                        f"({self._peers_error})")
    if name not in getattr(peers, "PEERS", {}):
      raise Unavailable(f"not a built-in nor in benchmarks.peers.PEERS "
                        f"({sorted(getattr(peers, 'PEERS', {}))})")
    return getattr(peers, "LR_FAMILY", {}).get(name, "adam")

  def runner(self, task: tasks_lib.Task, name: str, lr: float) -> Runner:
    try:
      opt = builtin(name)
    except KeyError:
      return self.peers().PEERS[name](task, lr)
    key = (task.name, name)
    if key not in self._steps:
      self._steps[key] = builtin_step(task, opt)
    init, step = self._steps[key]
    lr_arr = jnp.asarray(lr, jnp.float32)
    return Runner(init, lambda p, s, x, y, k: step(p, s, x, y, k, lr_arr))


# --------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass
class Run:
  """One optimizer at one rate on one seed of one task, and what it measured."""

  task: str
  optimizer: str
  lr: float
  seed: int
  phase: str
  runner: Runner
  params: Params = None
  state: OptState = None
  losses: List[float] = dataclasses.field(default_factory=list)
  times: List[float] = dataclasses.field(default_factory=list)
  evals: List[Dict[str, float]] = dataclasses.field(default_factory=list)
  nonfinite: int = 0
  stopped_at: Optional[int] = None
  error: Optional[str] = None
  result: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def label(self) -> str:
    return f"{self.optimizer}@{self.lr:g}"


def smooth(values: Sequence[float], beta: float = SMOOTH_BETA) -> np.ndarray:
  """Bias-corrected EMA; non-finite values propagate as NaN from then on."""
  out, avg = np.empty(len(values)), 0.0
  for t, v in enumerate(values, 1):
    avg = beta * avg + (1 - beta) * v
    out[t - 1] = avg / (1 - beta ** t)
  return out


def first_at_or_below(curve: np.ndarray, target: float) -> Optional[int]:
  hits = np.nonzero(curve <= target)[0]
  return int(hits[0]) + 1 if hits.size else None


def eval_points(steps: int, count: int = 4) -> List[int]:
  return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def run_group(task: tasks_lib.Task, runs: List[Run], seed: int, steps: int,
              block: int, progress: Callable[[int], None]) -> None:
  """Trains ``runs`` (same seed) together, block by block, timing every step."""
  xs, ys = task.batches(seed, steps)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed + 1000), steps))
  params0 = task.init(jax.random.PRNGKey(seed))
  for r in runs:
    r.params = params0
    try:
      r.state = r.runner.init(params0, jax.random.PRNGKey(seed + 2000))
    except Exception as e:  # noqa: BLE001 - a peer that fails: record, go on
      r.error, r.stopped_at = f"init: {type(e).__name__}: {e}", 0
  checkpoints = eval_points(steps)
  for b, t0 in enumerate(range(0, steps, block)):
    t1 = min(steps, t0 + block)
    xb = jax.device_put(list(xs[t0:t1]))
    yb = jax.device_put(list(ys[t0:t1]))
    kb = jax.device_put(list(keys[t0:t1]))
    jax.block_until_ready((xb, yb, kb))
    order = runs[b % len(runs):] + runs[:b % len(runs)]
    for r in order:
      if r.stopped_at is not None:
        continue
      try:
        for i in range(t1 - t0):
          tic = time.perf_counter()
          params, state, loss = r.runner.step(r.params, r.state, xb[i], yb[i], kb[i])
          jax.block_until_ready((params, loss))
          r.times.append(time.perf_counter() - tic)
          r.params, r.state = params, state
          loss = float(loss)
          r.losses.append(loss)
          if not math.isfinite(loss):
            r.nonfinite += 1
            if r.nonfinite >= STOP_AFTER_NONFINITE:
              r.stopped_at = t0 + i + 1
              break
      except Exception as e:  # noqa: BLE001 - record, keep the others going
        r.error, r.stopped_at = f"step {len(r.losses)}: {type(e).__name__}: {e}", len(r.losses)
      if r.stopped_at is None and t1 in checkpoints:
        vl, va = task.evaluate(r.params, "val")
        r.evals.append(dict(step=t1, val_loss=vl, val_acc=va))
    progress(t1)


def summarise_run(task: tasks_lib.Task, r: Run, steps: int) -> Dict[str, Any]:
  """The run's metrics, JSON-ready (the curve every ``k`` steps)."""
  n = len(r.losses)
  losses = np.asarray(r.losses + [np.nan] * (steps - n))
  sm = smooth(losses)
  times = np.asarray(r.times, float)
  later = times[1:] if times.size > 1 else times
  med = float(np.median(later)) if later.size else None
  clock = np.concatenate([[med if med is not None else 0.0], later]) if times.size else times
  clock = np.cumsum(np.concatenate([clock, np.full(steps - clock.size, np.nan)]))
  hit = first_at_or_below(sm, task.target_loss)
  if r.stopped_at is None and n == steps:
    train_loss, train_acc = task.evaluate(r.params, "train")
    val_loss, val_acc = (r.evals[-1]["val_loss"], r.evals[-1]["val_acc"])
  else:
    train_loss = train_acc = val_loss = val_acc = None
  k = max(1, steps // 250)
  at = np.arange(k, steps + 1, k)
  out = dict(
      task=r.task, optimizer=r.optimizer, lr=r.lr, seed=r.seed, phase=r.phase,
      steps_done=n, stopped_at=r.stopped_at, error=r.error,
      nan_count=int(np.sum(~np.isfinite(np.asarray(r.losses)))) if n else 0,
      final_train_loss=train_loss, final_train_acc=train_acc,
      final_val_loss=val_loss, final_val_acc=val_acc,
      final_smoothed_loss=_num(sm[-1]), first_loss=_num(losses[0]),
      steps_to_target=hit, seconds_to_target=_num(clock[hit - 1]) if hit else None,
      ms_per_step_median=None if med is None else 1e3 * med,
      ms_per_step_mean=float(1e3 * np.mean(later)) if later.size else None,
      first_step_seconds=float(times[0]) if times.size else None,
      total_step_seconds=float(np.sum(times)),
      evals=r.evals,
      curve=dict(step=at.tolist(), smoothed=[_num(v) for v in sm[at - 1]],
                 raw=[_num(np.mean(losses[a - k:a])) for a in at],
                 seconds=[_num(v) for v in clock[at - 1]]))
  out.update(_llqr_info(r.state))
  return out


def _num(v) -> Optional[float]:
  v = float(v)
  return v if math.isfinite(v) else None


def _llqr_info(state) -> Dict[str, Any]:
  if "llqr_optax" not in sys.modules or state is None:
    return {}
  try:
    s = sys.modules["llqr_optax"].find_state(state)
  except Exception:  # noqa: BLE001 - no llqr in this optimizer
    return {}
  return dict(refits=int(s.refits), skipped_refits=int(s.skipped_refits),
              skipped_updates=int(s.skipped_updates), damping=float(s.damping))


def add_ratios(results: List[Dict[str, Any]], reference: str = "adam") -> None:
  """Per-step time over the reference's, within one interleaved group."""
  ref = [r for r in results if r["optimizer"] == reference and r["ms_per_step_median"]]
  for r in results:
    r["ratio_vs_adam_median"] = r["ratio_vs_adam_mean"] = None
    if ref and r["ms_per_step_median"]:
      base = ref[0] if len(ref) == 1 else min(ref, key=lambda a: abs(math.log(a["lr"] / r["lr"])))
      r["ratio_vs_adam_median"] = r["ms_per_step_median"] / base["ms_per_step_median"]
      r["ratio_vs_adam_mean"] = r["ms_per_step_mean"] / base["ms_per_step_mean"]


# --------------------------------------------------------------------------
# Protocol.


def lr_grid(task: tasks_lib.Task, family: str, mults: Sequence[float],
            lrs: Optional[Sequence[float]], tuned: bool = True) -> List[float]:
  """The rates an optimizer is tried at (only the base rate if not tuned)."""
  if lrs:
    return [float(v) for v in lrs]
  return [float(f"{task.base_lrs[family] * m:.6g}") for m in (mults if tuned else [1.0])]


def _key_steps(result: Dict[str, Any]) -> Tuple[float, float]:
  """Steps to target first (∞ if never), then the final loss: the selection
  for a study whose metric is steps to target."""
  hit = result["steps_to_target"]
  return (math.inf if hit is None else float(hit), _key_loss(result))


def _key_loss(result: Dict[str, Any]) -> float:
  v = result["final_train_loss"]
  return v if v is not None and math.isfinite(v) else math.inf


def expand_alternatives(name: str) -> List[str]:
  """``"llqr[damping=0.1|1,ema=0.9]+adam"`` → one name per combination.

  ``|`` separates the values of one option that the harness tunes, on the
  first seed, together with the learning rate.
  """
  m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](\+[a-z_]+)?", name)
  if not m or "|" not in m.group(2):
    return [name]
  head, opts, tail = m.groups()
  items = []
  depth, cur = 0, ""
  for ch in opts:
    if ch == "," and depth == 0:
      items.append(cur)
      cur = ""
      continue
    depth += {"(": 1, ")": -1}.get(ch, 0)
    cur += ch
  items.append(cur)
  choices = []
  for item in filter(None, (t.strip() for t in items)):
    key, _, value = item.partition("=")
    choices.append([f"{key}={v.strip()}" for v in value.split("|")])
  import itertools
  return [f"{head}[{','.join(c)}]{tail or ''}" for c in itertools.product(*choices)]


def summarise(task: tasks_lib.Task, names: List[str], results: List[Dict[str, Any]],
              seeds: Sequence[int], best: Dict[str, Tuple[str, float]],
              edges: Optional[Dict[str, Dict[str, bool]]] = None) -> List[Dict[str, Any]]:
  """Per optimizer: the grid, the best rate (and variant) and its metrics over
  seeds."""
  rows = []
  stat = lambda v: None if not v else dict(median=float(np.median(v)),
                                           min=float(np.min(v)), max=float(np.max(v)))
  for name in names:
    variant, lr = best[name]
    variants = expand_alternatives(name)
    grid = [r for r in results if r["optimizer"] in variants and r["phase"] == "grid"]
    sel = [r for r in results if r["optimizer"] == variant and r["lr"] == lr
           and r["seed"] in seeds and (r["phase"] == "seed" or r["seed"] == seeds[0])]
    sel.sort(key=lambda r: r["seed"])
    vals = lambda key: [r[key] for r in sel if r[key] is not None]
    hits = [r["steps_to_target"] for r in sel]
    label = lambda r: (f"{r['lr']:g}" if len(variants) == 1
                       else f"{r['optimizer']}@{r['lr']:g}")
    rows.append(dict(
        task=task.name, optimizer=name, variant=variant, best_lr=lr,
        grid={label(r): r["final_train_loss"] for r in grid},
        **(edges or {}).get(name, {}),
        seeds=[r["seed"] for r in sel],
        final_train_loss=stat(vals("final_train_loss")),
        final_val_loss=stat(vals("final_val_loss")),
        final_val_acc=stat(vals("final_val_acc")),
        steps_to_target=hits, reached_target=sum(h is not None for h in hits),
        steps_to_target_median=(float(np.median(hits)) if hits and all(
            h is not None for h in hits) else None),
        seconds_to_target=[r["seconds_to_target"] for r in sel],
        seconds_to_target_median=(float(np.median(vals("seconds_to_target")))
                                  if hits and all(h is not None for h in hits) else None),
        ms_per_step_median=stat(vals("ms_per_step_median")),
        ms_per_step_mean=stat(vals("ms_per_step_mean")),
        ratio_vs_adam_median=stat(vals("ratio_vs_adam_median")),
        ratio_vs_adam_mean=stat(vals("ratio_vs_adam_mean")),
        compile_seconds=max([r["first_step_seconds"] for r in results
                             if r["optimizer"] in variants
                             and r["first_step_seconds"] is not None] or [None]),
        nan_count=sum(r["nan_count"] for r in sel),
        errors=[r["error"] for r in sel if r["error"]]))
  return rows


def run_task(task: tasks_lib.Task, names: List[str], opts: Optimizers,
             seeds: Sequence[int], mults: Sequence[float],
             lrs: Optional[Sequence[float]], block: int, clock: "Clock",
             untuned: Sequence[str] = (), max_extend: int = 3,
             select: str = "loss"):
  """The grid on the first seed, then the best rates on the others.

  Each name may list alternatives (:func:`expand_alternatives`), tuned with
  the rate. When the best rate of a variant lies at an edge of the rates
  tried, the grid is extended by a factor 3 beyond it, up to ``max_extend``
  times, until it does not (``lr_at_edge`` says if it still does).
  ``select="loss"`` picks the lowest final training loss, ``"steps"`` the
  fewest steps to the target (then the lowest loss).
  """
  key = _key_steps if select == "steps" else _key_loss
  steps = task.steps
  results: List[Dict[str, Any]] = []
  variants = {n: expand_alternatives(n) for n in names}
  grids = {v: lr_grid(task, opts.family(v), mults, lrs, n not in untuned)
           for n in names for v in variants[n]}

  def group(seed, phase, pairs):
    runs = [Run(task.name, n, lr, seed, phase, opts.runner(task, n, lr))
            for n, lr in pairs]
    tag = f"[{task.name} seed {seed} {phase}: {len(runs)} runs]"
    clock.begin(tag, len(runs) * steps)
    run_group(task, runs, seed, steps, block,
              lambda t: clock.tick(len(runs), t, steps))
    out = [summarise_run(task, r, steps) for r in runs]
    add_ratios(out)
    for r in out:
      clock.report(r)
    results.extend(out)
    return out

  grid_results = group(seeds[0], "grid", [(v, lr) for v in grids for lr in grids[v]])
  tunable = [v for n in names if n not in untuned and not lrs for v in variants[n]]
  for _ in range(max_extend):
    more = []
    for v in tunable:
      mine = [r for r in grid_results if r["optimizer"] == v]
      tried = sorted({r["lr"] for r in mine})
      best_lr = min(mine, key=key)["lr"]
      if not math.isfinite(_key_loss(min(mine, key=key))) or len(tried) < 2:
        continue
      if best_lr == tried[0]:
        more.append((v, float(f"{best_lr / 3:.6g}")))
      elif best_lr == tried[-1]:
        more.append((v, float(f"{best_lr * 3:.6g}")))
    if not more:
      break
    print(f"  {task.name}: best rate at the grid's edge, extending: "
          + ", ".join(f"{v}@{lr:g}" for v, lr in more), flush=True)
    for v, lr in more:
      grids[v] = sorted(grids[v] + [lr])
    grid_results += group(seeds[0], "grid", more)
  best, edges = {}, {}
  for n in names:
    mine = [r for r in grid_results if r["optimizer"] in variants[n]]
    top = min(mine, key=key)
    best[n] = (top["optimizer"], top["lr"])
    tried = sorted({r["lr"] for r in mine if r["optimizer"] == top["optimizer"]})
    edges[n] = dict(lr_at_edge=bool(len(tried) > 1 and top["lr"] in (tried[0], tried[-1])),
                    variant_at_edge=bool(len(variants[n]) > 2 and top["optimizer"]
                                         in (variants[n][0], variants[n][-1])))
    print(f"  {task.name} {n}: best {top['optimizer']} at rate {top['lr']:g} of "
          + ", ".join(f"{r['optimizer'] if len(variants[n]) > 1 else ''}@{r['lr']:g} "
                      f"({_fmt(r['final_train_loss'])})" for r in mine),
          flush=True)
  for seed in seeds[1:]:
    group(seed, "seed", [best[n] for n in names])
  return results, summarise(task, names, results, list(seeds), best, edges), grids


def _fmt(v, digits=4) -> str:
  return "–" if v is None else f"{v:.{digits}f}"


class Clock:
  """Progress lines: elapsed time and an ETA from the run-steps still to do."""

  def __init__(self, total_work: float):
    self.t0 = time.perf_counter()
    self.total = total_work
    self.done = 0.0
    self.group_start = self.t0
    self.tag = ""
    self.last = 0.0

  def begin(self, tag: str, work: float):
    self.tag, self.group_start = tag, time.perf_counter()
    self.group_done_before = self.done
    print(f"{tag} start  [{self.elapsed()}]", flush=True)

  def elapsed(self) -> str:
    return _dur(time.perf_counter() - self.t0)

  def eta(self) -> str:
    spent = time.perf_counter() - self.t0
    return _dur(spent / self.done * (self.total - self.done)) if self.done else "?"

  def tick(self, nruns: int, t: int, steps: int):
    self.done = self.group_done_before + nruns * t
    now = time.perf_counter()
    if t == steps or now - self.last > 30:
      self.last = now
      print(f"{self.tag} step {t}/{steps}  [elapsed {self.elapsed()}, "
            f"ETA {self.eta()}]", flush=True)

  def report(self, r: Dict[str, Any]):
    print(f"  {r['optimizer']:>24s} lr {r['lr']:<8g} seed {r['seed']}: train "
          f"{_fmt(r['final_train_loss'])}  val {_fmt(r['final_val_loss'])} / "
          f"{_fmt(None if r['final_val_acc'] is None else 100 * r['final_val_acc'], 1)}%"
          f"  target@{r['steps_to_target']}  "
          f"{_fmt(r['ms_per_step_median'], 2)} / {_fmt(r['ms_per_step_mean'], 2)} ms"
          f"  x adam {_fmt(r['ratio_vs_adam_median'], 2)} / "
          f"{_fmt(r['ratio_vs_adam_mean'], 2)}  compile+1st "
          f"{_fmt(r['first_step_seconds'], 1)}s  nan {r['nan_count']}"
          + (f"  ERROR {r['error']}" if r["error"] else "")
          + f"  [elapsed {self.elapsed()}, ETA {self.eta()}]", flush=True)


def _dur(s: float) -> str:
  s = int(round(s))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# --------------------------------------------------------------------------
# Provenance, plots, CLI.


def provenance() -> Dict[str, Any]:
  """Commit, this script's state and hash, versions, CPU, load."""
  versions = {}
  for mod in ("flax", "llqr_optax"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # noqa: BLE001
      versions[mod] = None
  return dict(**provenance_lib.of_script(__file__), cpu_count=os.cpu_count(),
              python=platform.python_version(), jax=jax.__version__,
              jaxlib=getattr(__import__("jaxlib"), "__version__", None),
              optax=optax.__version__, numpy=np.__version__, **versions,
              backend=jax.default_backend(), devices=str(jax.devices()),
              platform=platform.platform(),
              load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def plot(task: Dict[str, Any], rows: List[Dict[str, Any]],
         runs: List[Dict[str, Any]], path: Path) -> Path:
  """Smoothed training loss vs step and vs seconds: median over seeds,
  band min–max, each optimizer at its best rate."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
  for i, row in enumerate(rows):
    sel = [r for r in runs if r["optimizer"] == row.get("variant", row["optimizer"])
           and r["lr"] == row["best_lr"] and r["seed"] in row["seeds"]
           and (r["phase"] == "seed" or r["seed"] == row["seeds"][0])]
    if not sel:
      continue
    nan = lambda v: np.nan if v is None else v
    y = np.array([[nan(v) for v in r["curve"]["smoothed"]] for r in sel])
    sec = np.array([[nan(v) for v in r["curve"]["seconds"]] for r in sel])
    step = np.asarray(sel[0]["curve"]["step"])
    if np.all(np.isnan(y)):
      continue
    with np.errstate(all="ignore"), _quiet():
      med, lo, hi = np.nanmedian(y, 0), np.nanmin(y, 0), np.nanmax(y, 0)
      xs = np.nanmedian(sec, 0)
    style = dict(color=f"C{i % 10}", ls="-" if i < 10 else "--")
    label = f"{row['optimizer']} ({row['best_lr']:g})"
    for ax, x in ((axes[0], step), (axes[1], xs)):
      ax.plot(x, med, label=label, **style)
      ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0)
  for ax, xl in ((axes[0], "step"), (axes[1], "seconds (summed step times, median over seeds)")):
    ax.axhline(task["target_loss"], color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("training loss (batch, EMA 0.98)")
    ax.grid(True, which="both", alpha=0.3)
  axes[1].set_xscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{task['name']}: {task['description']}\nmedian over seeds "
               f"{rows[0]['seeds'] if rows else []}, band min–max; dotted: target "
               f"{task['target_loss']:g}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


class _quiet:
  def __enter__(self):
    import warnings
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore")

  def __exit__(self, *a):
    return self._w.__exit__(*a)


def split_names(text: str) -> List[str]:
  """Optimizer names separated by commas outside brackets (options inside)."""
  names, depth, cur = [], 0, ""
  for ch in text:
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      names.append(cur)
      cur = ""
    else:
      cur += ch
  return [n.strip() for n in names + [cur] if n.strip()]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", nargs="+", default=list(tasks_lib.TASK_NAMES),
                 choices=tasks_lib.TASK_NAMES)
  p.add_argument("--optimizers", nargs="+", default=None,
                 help="built-ins, llqr_<geometry>_<structure>+<base>, or names in "
                      "benchmarks/peers.py, separated by spaces or commas, for "
                      f"every task (default: {' '.join(DEFAULT_OPTIMIZERS)}; on "
                      "the ResNet only "
                      f"{' '.join(TASK_OPTIMIZERS['mnist1d_resnet'])})")
  p.add_argument("--lr-mults", type=float, nargs="+", default=None,
                 help="multipliers of each family's base rate (default 0.3 1 3; "
                      "quick 0.3 1)")
  p.add_argument("--lrs", type=float, nargs="+", default=None,
                 help="absolute rates for every optimizer, instead of the grid")
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="the first tunes the rate (default 0 1 2; quick 0 1)")
  p.add_argument("--steps", type=int, default=None,
                 help="steps per run for every task (default: each task's own)")
  p.add_argument("--select", choices=["loss", "steps"], default="loss",
                 help="how the grid picks a rate (and variant): the lowest final "
                      "training loss, or the fewest steps to the target (then "
                      "the lowest loss)")
  p.add_argument("--batch", type=int, default=None,
                 help="batch size for every task (default: each task's own)")
  p.add_argument("--block", type=int, default=None,
                 help="steps a run takes before the next run's turn (default "
                      "min(50, steps // 10))")
  p.add_argument("--tune-all", action="store_true",
                 help="tune llqr on every task (by default, on the ResNet and the "
                      "Transformer, llqr runs at its base optimizer's base rate)")
  p.add_argument("--max-extend", type=int, default=None,
                 help="how many times a rate grid may grow past an edge where "
                      "its best rate lies, by a factor 3 each (default 3; quick 0)")
  p.add_argument("--quick", action="store_true",
                 help="tiny models, 40 steps, 2 rates, 2 seeds, no grid "
                      "extension: seconds per task")
  p.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "out")
  p.add_argument("--tag", default="main",
                 help="names the output: training_<tag>.json (default main)")
  args = p.parse_args(argv)
  # "a,b c" and "a b c" both list optimizers (the Makefile passes commas).
  args.explicit_optimizers = args.optimizers is not None
  args.optimizers = [n for a in (args.optimizers or DEFAULT_OPTIMIZERS)
                     for n in split_names(a)]
  args.lr_mults = args.lr_mults or ([0.3, 1.0] if args.quick else list(LR_MULTS))
  args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
  if args.max_extend is None:
    args.max_extend = 0 if args.quick else 3
  if args.steps is not None and args.steps < 2:
    p.error("--steps must be at least 2 (the first step compiles)")
  return args


def main(argv=None) -> Dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  t0 = time.perf_counter()
  prov = provenance()
  print(f"training: jax {jax.__version__}, optax {optax.__version__} on "
        f"{jax.default_backend()}, {os.cpu_count()} cpus, load "
        f"{prov['load_average']}; {'quick' if args.quick else 'full'} run; tasks "
        f"{args.tasks}; seeds {args.seeds}", flush=True)
  opts = Optimizers()
  task_objs, names, skipped = [], {}, {}
  for tn in args.tasks:
    task = tasks_lib.get_task(tn, quick=args.quick, batch=args.batch)
    if args.steps:
      task = dataclasses.replace(task, steps=args.steps)
    task_objs.append(task)
  for n in args.optimizers:
    try:
      for v in expand_alternatives(n):
        opts.family(v)
      if n not in names:
        names[n] = True
    except Unavailable as e:
      skipped[n] = str(e)
      print(f"skipping {n}: {e}", flush=True)
  names = list(names)
  if not names:
    raise SystemExit("no optimizer can run here")
  nrates = len(args.lrs) if args.lrs else len(args.lr_mults)
  work = sum(t.steps * sum(len(expand_alternatives(n)) * nrates + len(args.seeds) - 1
                           for n in names if args.explicit_optimizers or args.quick
                           or n in TASK_OPTIMIZERS.get(t.name, names))
             for t in task_objs)
  clock = Clock(work)

  all_runs, summary, task_info, grids, pngs = [], [], [], {}, []
  untuned_by_task: Dict[str, List[str]] = {}
  for task in task_objs:
    tt = time.perf_counter()
    block = args.block or max(1, min(50, task.steps // 10))
    print(f"== {task.name}: {task.num_params} params; {task.description}; "
          f"{task.steps} steps; target {task.target_loss}", flush=True)
    mine = [n for n in names if args.explicit_optimizers or args.quick
            or n in TASK_OPTIMIZERS.get(task.name, names)]
    untuned = [] if (args.tune_all or args.quick or task.name not in UNTUNED_LLQR_TASKS) \
        else [n for n in mine if parse_llqr(n)]
    if untuned:
      print(f"   not tuned here (base rate): {untuned}", flush=True)
    runs, rows, grid = run_task(task, mine, opts, args.seeds, args.lr_mults,
                                args.lrs, block, clock, untuned,
                                max_extend=args.max_extend, select=args.select)
    untuned_by_task[task.name] = untuned
    all_runs += runs
    summary += rows
    grids[task.name] = grid
    task_info.append(dict(name=task.name, description=task.description,
                          num_params=task.num_params, batch_size=task.batch_size,
                          steps=task.steps, target_loss=task.target_loss,
                          base_lrs=dict(task.base_lrs), block=block,
                          info=dict(task.info), seconds=time.perf_counter() - tt))
  args.out.mkdir(parents=True, exist_ok=True)
  for info in task_info:
    rows = [r for r in summary if r["task"] == info["name"]]
    runs = [r for r in all_runs if r["task"] == info["name"]]
    png = args.out / f"training_{args.tag}_{info['name']}.png"
    pngs.append(plot(info, rows, runs, png).name)
  wall = time.perf_counter() - t0
  meta = dict(
      script="benchmarks/training.py", argv=argv,
      command=shlex.join(["python", "benchmarks/training.py"] + argv),
      tag=args.tag, quick=args.quick, seeds=args.seeds, lr_mults=args.lr_mults,
      lrs=args.lrs, optimizers=names, skipped=skipped, grids=grids,
      select=args.select,
      untuned=untuned_by_task,
      smoothing_beta=SMOOTH_BETA, stop_after_nonfinite=STOP_AFTER_NONFINITE,
      peers_error=opts._peers_error,
      timing="per-step wall time from the call to block_until_ready on the new "
             "params and loss; median and mean exclude the first step (which "
             "compiles); ratios over adam within each group of interleaved runs",
      wall_seconds=wall, load_average_start=prov.pop("load_average"),
      load_average_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      plots=pngs, **prov)
  out = dict(meta=meta, tasks=task_info, summary=summary, runs=all_runs)
  js = args.out / f"training_{args.tag}.json"
  js.write_text(json.dumps(out, indent=1) + "\n")
  print(f"\nwrote {js} and {len(pngs)} plots; total {_dur(wall)}", flush=True)
  for info in task_info:
    print(f"\n{info['name']} (target {info['target_loss']}):")
    for r in (r for r in summary if r["task"] == info["name"]):
      ftl, ratio = r["final_train_loss"], r["ratio_vs_adam_mean"]
      print(f"  {r['optimizer']:>24s} lr {r['best_lr']:<8g} train "
            f"{_fmt(ftl and ftl['median'])} val acc "
            f"{_fmt(r['final_val_acc'] and 100 * r['final_val_acc']['median'], 1)}% "
            f"target {r['reached_target']}/{len(r['seeds'])} at "
            f"{r['steps_to_target_median']} steps, {_fmt(r['seconds_to_target_median'], 1)}s"
            f"  x adam (mean) {_fmt(ratio and ratio['median'], 2)}", flush=True)
  return out


if __name__ == "__main__":
  main()
