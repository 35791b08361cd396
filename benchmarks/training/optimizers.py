"""The training harness's optimizers: the Runner protocol and the built-ins.

A :class:`Runner` is how the harness drives one optimizer at one rate on one
task. Built-ins (:func:`builtin`: Adam, AdamW, SGD-momentum, Muon, Sophia,
the exact damped step before a base, and llqr before or around a base) take
the rate as a traced argument, so one compilation per (task, optimizer)
serves the rate grid; any other name is a peer's (``benchmarks/training/peers.py``).
:class:`Optimizers` builds and caches them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks import tasks as tasks_lib
from benchmarks.common import refit_every
from benchmarks.training import peers as peers_lib
from benchmarks.training.names import (STRUCTURE_ALIASES, Unavailable, parse_llqr,
                                       split_options)
from benchmarks.training.runner import OptState, Params, Runner  # noqa: F401

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
  jitted = jax.jit(step, static_argnames="refit")
  every = refit_every(opt.options)

  def llqr_step(params, opt_state, x, y, key, lr):
    count = int(llqr_optax.find_state(opt_state).count)
    if count == 0:  # compile the ordinary step too, inside the first step's time
      jax.block_until_ready(jitted(params, opt_state, x, y, key, lr, refit=False))
    return jitted(params, opt_state, x, y, key, lr,
                  refit=llqr_optax.refit_due(count, every))
  return init, llqr_step


class Optimizers:
  """Builds and caches runners: built-ins, then :mod:`benchmarks.training.peers`'s
  (``PEERS``, ``LR_FAMILY``)."""

  def __init__(self):
    self._steps: Dict[Tuple[str, str], Tuple[Callable, Callable]] = {}

  def peers(self):
    """The peers module, :mod:`benchmarks.training.peers`."""
    return peers_lib

  def family(self, name: str) -> str:
    """The learning-rate family of ``name``; raises ``Unavailable``."""
    try:
      return builtin(name).family
    except KeyError:
      pass
    peers = self.peers()
    if name not in peers.PEERS:
      raise Unavailable(f"not a built-in nor in benchmarks.training.peers.PEERS "
                        f"({sorted(peers.PEERS)})")
    return peers.LR_FAMILY.get(name, "adam")

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
