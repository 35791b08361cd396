"""llqr's state and what reads it: the stored ``U``, diagnostics, lookup.

:class:`LLQRState` is a pytree of arrays (checkpointable as is);
:func:`find_state` finds it inside any optimizer state, :func:`diagnostics`
reports its scalars and :func:`precondition` applies its ``U``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from llqr_optax import _nnx
from llqr_optax import structures
PyTree = Any


class LLQRState(NamedTuple):
  r"""State of :func:`scale_by_llqr`: a pytree of arrays, checkpointable.

  Between refits the transform outputs ``c · U(g)`` with the stored
  preconditioner ``U`` and scale ``c``. At a refit ``U`` is refitted to the
  LQR objective ``J(U)`` (:mod:`llqr_optax.fitting.objective`), whose value
  after the refit is ``objective``, and the fit is checked against the loss
  by

  .. math::

     \hat\rho = \frac{\ell(\theta + \delta) - \ell(\theta)}
       {m(\delta)}, \quad \delta = -\alpha^\star U \bar g,

  with :math:`m` the quadratic model and :math:`\alpha^\star` its best step
  size along :math:`-U \bar g` (``reduction_ratio``).

  Attributes:
    count: steps seen.
    preconditioner: per-leaf structure states (float32), shaped like params.
    key: the PRNG key (raw ``uint32[2]``) for sampled geometries.
    damping: the current ``λ``.
    refits: refits done.
    skipped_refits: refits that were due but skipped because something was
      not finite (the gradient, the refit batch's samples or curvature
      products, or the fit); the last good preconditioner is kept.
    skipped_updates: steps whose gradient, or preconditioned gradient ``U(g)``,
      was not finite (their output was zeroed).
    objective: ``J`` after the last refit (lower is better; ``−½ gᵀA⁻¹g`` is
      its floor).
    output_scale: the scalar ``c`` of the output ``c · U(g)``: 1, or with
      ``normalize=True`` the gain that keeps ``‖c U g‖ ≈ ‖g‖`` on the last
      refit's samples.
    reduction_ratio: ``ρ̂`` of the last refit: the actual change of the loss
      over the quadratic model's change, at the best-scaled preconditioned step
      on the refit batch (1 means the model is exact; it drives the damping
      when ``adapt_damping=True``).
    curvature_scale: ``κ``, Hutchinson's estimate of ``tr(C)/P`` (the mean
      eigenvalue of ``C``) at the last refit with ``relative_damping=True``,
      where the damping is ``λ = damping · κ``, ``nan`` before it; without
      ``relative_damping`` it is not measured (it costs four curvature
      products a refit) and stays 0.
    refit_grad_norm: ``‖g‖`` at the last refit (0 before it, and always
      without ``refit_growth``).
    refit_requested: whether a step's gradient grew past ``refit_growth ·
      refit_grad_norm`` without a refit: a two-step loop refits next
      (:func:`refit_due` reads it).
    rejected_refits: refits whose fitted ``U`` failed the check
      ``J(U) < 0`` on the refit's own samples; it was scaled to its best
      scale along its direction, or, where no positive scale lowers the
      model, the previous ``U`` was kept (:mod:`llqr_optax.safety`).
    guard_trips: times the refit batch's loss, averaged over refits, rose
      past ``guard`` times its best: ``U`` became the identity at its best
      scale and refits paused (:mod:`llqr_optax.safety`).
    guard_until: the step count before which refits pause after a trip (0
      before any).
    refit_loss: the refit batch's loss averaged over refits (an EMA with
      ``β = ½``; ``nan`` before the first refit, and restarted by a trip).
    best_refit_loss: the lowest ``refit_loss`` so far (``nan`` before).
    first_refit_loss: the first refit's loss (``nan`` before).
    last_refit_loss: the last refit's loss (``nan`` before).
    refit_loss_noise: the average of the squared differences of successive
      refit losses, from the fifth refit on (0 before): twice the variance
      of the loss's noise, which the guard reads.
    guard_alarms: the refits in a row whose averaged loss rose past both of
      the guard's bars (two trip it).

  Example:
    >>> import jax.numpy as jnp, optax, llqr_optax
    >>> tx = llqr_optax.llqr(loss="squared_error")
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> int(state.refits), int(state.skipped_updates), float(state.damping)
    (0, 0, 1.0)
    >>> bool(jnp.isnan(state.reduction_ratio))  # nan until the first refit
    True
  """
  count: jax.Array
  preconditioner: PyTree
  key: jax.Array
  damping: jax.Array
  refits: jax.Array
  skipped_refits: jax.Array
  skipped_updates: jax.Array
  objective: jax.Array
  output_scale: jax.Array
  reduction_ratio: jax.Array
  curvature_scale: jax.Array
  refit_grad_norm: jax.Array
  refit_requested: jax.Array
  rejected_refits: jax.Array
  guard_trips: jax.Array
  guard_until: jax.Array
  refit_loss: jax.Array
  best_refit_loss: jax.Array
  first_refit_loss: jax.Array
  last_refit_loss: jax.Array
  refit_loss_noise: jax.Array
  guard_alarms: jax.Array


def scaled_apply(state: LLQRState, tree: PyTree) -> PyTree:
  """``c · U(tree)`` for an :class:`LLQRState` and a tree of bare arrays
  (:func:`precondition` finds the state and unwraps the tree first)."""
  out = structures.apply(state.preconditioner, tree)
  return jax.tree.map(lambda u: (state.output_scale * u).astype(u.dtype), out)


def find_state(state: Any) -> LLQRState:
  """The first :class:`LLQRState` inside an optimizer state (e.g. a chain's).

  The state is searched depth-first, so it works through ``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.masked``, ``optax.MultiSteps`` and
  any other wrapper that keeps its inner states in a pytree.

  Args:
    state: an optimizer state, or an :class:`LLQRState` (returned as is).

  Returns:
    The :class:`LLQRState`; its diagnostics are scalar arrays.

  Raises:
    ValueError: if ``state`` holds no :class:`LLQRState`.

  Example:
    >>> import jax.numpy as jnp, optax, llqr_optax
    >>> tx = optax.chain(llqr_optax.llqr(loss="squared_error"), optax.sgd(0.1))
    >>> int(find_state(tx.init({"w": jnp.zeros(3)})).refits)
    0
  """
  if isinstance(state, LLQRState):
    return state
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LLQRState))
           if isinstance(s, LLQRState)]
  if not found:
    raise ValueError("state holds no LLQRState: pass the state of llqr(...) or of "
                     "a chain that contains it.")
  return found[0]


#: The scalars of :class:`LLQRState` that :func:`diagnostics` reports.
DIAGNOSTICS = ("count", "refits", "skipped_refits", "skipped_updates",
               "objective", "reduction_ratio", "damping", "output_scale",
               "rejected_refits", "guard_trips", "refit_loss")


def diagnostics(state: Any, prefix: str = "") -> dict:
  """llqr's diagnostics as a dict of Python floats, for any logger.

  One device-to-host copy of the scalars of the :class:`LLQRState` inside
  ``state``: it waits for the step that made the state, so call it every few
  hundred steps, not at every one, when the loop's speed matters.

  What to look for: ``skipped_refits`` and ``skipped_updates`` stay 0 (each
  counts a refit or an update dropped because something was not finite).
  ``objective`` (``J`` of the averaged ``U`` on the last refit's batch; ``nan``
  before the first refit) is negative: where the average over refits
  (``ema``) overshoots on one batch's model, ``U`` is scaled back and
  ``rejected_refits`` counts it (a few are normal; most refits rejected
  means stale or poor fits: refit more often, or more damping).
  ``guard_trips`` above 0 means the loss rose while llqr preconditioned and
  llqr stood down for a while (:mod:`llqr_optax.safety`); ``refit_loss`` is
  the loss it watches. ``reduction_ratio`` (``ρ̂``, the loss change over the quadratic
  model's, at the best-scaled step of the last refit) near or somewhat above
  1 means the model predicts the loss well; below 0 the step the model
  predicts to lower the loss raised it (more damping, or
  ``adapt_damping=True``). The "Logging" recipe (``docs/recipes.md``) quotes the values
  ``make demo`` measures.

  Args:
    state: an optimizer state holding an :class:`LLQRState` (anything
      :func:`find_state` accepts).
    prefix: prepended to every key, e.g. ``"llqr/"``.

  Returns:
    ``{prefix + name: float}`` for ``count``, ``refits``, ``skipped_refits``,
    ``skipped_updates``, ``objective``, ``reduction_ratio``, ``damping``,
    ``output_scale``, ``rejected_refits``, ``guard_trips`` and ``refit_loss``
    (counters too are floats, so every logger takes them).

  Example:
    >>> import jax.numpy as jnp, optax, llqr_optax
    >>> tx = optax.chain(llqr_optax.llqr(loss="squared_error"), optax.adam(1e-3))
    >>> d = llqr_optax.diagnostics(tx.init({"w": jnp.zeros(3)}), prefix="llqr/")
    >>> d["llqr/refits"], d["llqr/damping"]
    (0.0, 1.0)
    >>> list(d)[:3]
    ['llqr/count', 'llqr/refits', 'llqr/skipped_refits']
  """
  found = find_state(state)
  values = jax.device_get([_nnx.scalar(getattr(found, name)) for name in DIAGNOSTICS])
  return {prefix + name: float(np.asarray(v)) for name, v in zip(DIAGNOSTICS, values)}


def precondition(state: Any, tree: PyTree) -> PyTree:
  r"""Applies the current preconditioner ``U`` of an llqr state to ``tree``.

  .. math::

     v \mapsto c \cdot U(v) = c \cdot \operatorname{blockdiag}_l(U_l)\, v,

  leaf by leaf, with the stored per-leaf structures ``U_l`` and scale ``c``.
  No refit, no state change: for analysis, SAM-style perturbations and tests.

  Args:
    state: an :class:`LLQRState`, or an optimizer state containing one.
    tree: a params-shaped pytree.

  Returns:
    ``c · U(tree)`` with ``c`` the state's ``output_scale`` (exactly what
    llqr outputs between refits), with the dtypes of ``tree``.

  Example:
    >>> import jax.numpy as jnp, optax, llqr_optax
    >>> tx = llqr_optax.llqr(loss="squared_error", structure="scalar")
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> llqr_optax.precondition(state, {"w": jnp.ones(3)})["w"]
    Array([1., 1., 1.], dtype=float32)
  """
  bare = scaled_apply(find_state(state), _nnx.unwrapped(tree))
  return jax.tree.unflatten(jax.tree.structure(tree), jax.tree.leaves(bare))
