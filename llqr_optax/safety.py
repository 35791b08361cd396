r"""Safe fits: a fitted ``U`` earns its place, and llqr stands down where it hurts.

Two checks run at every refit, at no extra curvature product in the
ordinary case.

**Acceptance** (:func:`accept_fit`). ``J`` of the fitted ``U`` on the refit's
own samples splits into its first- and second-order parts,
:math:`J(U) = a + b` with :math:`a = -\frac1{n_c}\sum_c g_c^\top U x_c` and
:math:`b = \frac1{2 n_c}\sum_c (U x_c)^\top A\, (U x_c)`, both known from the
fit's products, and :math:`J(sU) = s a + s^2 b`. What ``U`` must pass depends
on who sets the step's length (``accept``):

- ``"scale"`` (llqr as the whole optimizer, ``llqr(learning_rate=...)``):
  ``U``'s scale is the step's, so ``J(U) < 0``: the model predicts that the
  step ``−U g`` lowers the loss. The average over refits (``ema``) of a fit
  made where the curvature was lower overshoots, ``J(U) ≥ 0``; such a ``U``
  is scaled to its best scale along the same direction,

  .. math::

     s^\star = \frac{-a}{2b}, \qquad J(s^\star U) = -\frac{a^2}{4b} < 0 ;

- ``"direction"`` (before another transform, which sets the step's length:
  Adam reads a change of ``U``'s scale as a change of its rate for
  ``1/(1 − β₂)`` steps, so scaling ``U`` back would cost it): ``a < 0``,
  ``U x`` descends on average at some positive scale.

A ``U`` that no positive scale makes descend (``a ≥ 0``) is kept out: the
previous ``U`` stays. Every failed check counts in ``rejected_refits``.

**Guard** (:func:`guard_check`). ``J`` is the model of one step of ``−U g``;
it cannot see what the next transform does with ``U g`` (Adam normalises each
coordinate, so a ``U`` that mixes coordinates can climb while ``J`` is
negative), nor the many steps one ``U`` serves. The loss can: the refit
batch's loss, averaged over refits (``refit_loss``, an EMA with ``β = 0.8``),
is compared with its lowest value so far. When it exceeds ``guard`` times
that (and ``10⁻³`` of the first refit's loss, so that noise at a converged
loss never counts), llqr stands down: ``U`` becomes the identity at its best
scale (the next transform gets the gradient, as without llqr), refits pause
for ``refit_every · 2^(k−1)`` steps at the ``k``-th trip (``guard_trips``),
and the next refit starts from scratch, with ``TRIP_DAMPING`` (10) times the
damping after each trip: a trust region that shrinks, pulling later fits
toward a scaled identity (without it, the autoencoder of
``benchmarks/training/safe_sweep.py`` at damping 0.01 and Adam's rate 3e-2
tripped 6 times and ended at 2.7× Adam's loss).

A tighter guard reacts sooner and trips on noise: ``guard=1.2`` with
``β = ½`` holds every row of that sweep (damping 0.1 and 0.01, Adam's rates
1e-3 to 3e-2) within 1.08× Adam's loss, where the defaults leave the
damping-0.01 runs at 1e-2 and 3e-2 at 1.6× and 2.2×; but it also tripped
4 times in 300 steps on a batch-32 MLP that trained well
(``tests/test_reliability.py``'s), whose noisy average dips 20% below its
mean. The defaults stay ``guard=1.5``, ``β = 0.8``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from llqr_optax import sharding
from llqr_optax import structures
from llqr_optax.fitting import solvers
from llqr_optax.fitting.problem import Problem
from llqr_optax.fitting.refit import RefitResult

PyTree = Any

#: The guard's floor on the loss it compares, relative to the first refit's.
LOSS_FLOOR = 1e-3
#: ``β`` of the guard's average of the refit losses over refits (``½`` sees a
#: climb two or three refits sooner, and trips on the noise of batch-32
#: losses with ``guard=1.2``: see the module's docstring).
LOSS_EMA = 0.8


#: The factor on the damping per guard trip.
TRIP_DAMPING = 10.0
#: The most trips the damping grows for (``10⁸``×).
MAX_TRIP_GROWTH = 8


def tripped_damping(damping: jax.Array, trips: jax.Array) -> jax.Array:
  """``damping · TRIP_DAMPING^trips`` (trips capped at :data:`MAX_TRIP_GROWTH`).

  Example:
    >>> import jax.numpy as jnp
    >>> float(tripped_damping(jnp.float32(0.01), jnp.int32(2)))
    1.0
  """
  grow = jnp.float32(TRIP_DAMPING) ** jnp.minimum(trips, MAX_TRIP_GROWTH)
  return (damping * grow).astype(jnp.float32)


#: The values of ``accept``.
ACCEPT = ("scale", "direction")


def accept_fit(result: RefitResult, accept: str = "scale"
               ) -> Tuple[RefitResult, jax.Array, jax.Array]:
  r"""The fitted ``U`` if it passes ``accept``'s check; else ``s* U``, or nothing.

  Args:
    result: a refit's result, with ``objective = a + b`` and ``linear = a``.
    accept: ``"scale"`` (``J(U) < 0``; a ``U`` that fails is scaled by
      ``s* = −a/2b`` where ``a < 0``) or ``"direction"`` (``a < 0``).

  Returns:
    ``(result, failed, keep_old)``: the result, with ``U`` scaled by ``s*``
    where it was (its ``objective`` and ``norm_ratio`` follow; ``step`` and
    ``predicted``, best-scaled already, do not move); whether the check
    failed; and whether no positive scale makes ``U`` descend (``a ≥ 0``), so
    that the previous ``U`` must stay.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.ones((1, 2))}
    >>> problem = fitting.Problem(g, lambda v: {"w": 2.0 * v["w"]})  # A = 2I
    >>> big = structures.init({"w": jnp.ones(2)}, "scalar")  # U = I: J = 0
    >>> result = fitting.refit(problem, big, steps=0, ema=1.0)
    >>> fixed, failed, keep_old = accept_fit(result)
    >>> bool(failed), bool(keep_old), float(fixed.states["w"].scale)  # A⁻¹
    (True, False, 0.5)
    >>> bool(accept_fit(result, "direction")[1])  # -U g descends: passes
    False
  """
  if accept not in ACCEPT:
    raise ValueError(f"accept={accept!r} is unknown; choose one of {list(ACCEPT)}.")
  a = result.linear
  b = result.objective - a
  descends = a < 0
  if accept == "direction":
    return result, ~descends, ~descends
  failed = ~(result.objective < 0)
  shrink = failed & descends & (b > 0)
  s = jnp.where(shrink, -a / jnp.where(shrink, 2 * b, 1.0), 1.0)
  states = structures.map_states(lambda cls, st: cls.scale(st, s), result.states)
  objective = jnp.where(shrink, s * a / 2, result.objective)  # -a²/4b
  fixed = result._replace(states=states, objective=objective,
                          norm_ratio=result.norm_ratio / s)
  return fixed, failed, failed & ~shrink


class LossTrack(NamedTuple):
  """The refit losses the guard reads (fields of :class:`~llqr_optax.LLQRState`)."""
  refit_loss: jax.Array
  best_refit_loss: jax.Array
  first_refit_loss: jax.Array


def guard_check(track: LossTrack, loss: jax.Array, guard: Any
                ) -> Tuple[jax.Array, LossTrack]:
  r"""Whether the loss rose past ``guard`` times its best, and the new track.

  .. math::

     \bar\ell_k = \beta \bar\ell_{k-1} + (1 - \beta) \ell_k, \qquad
     \text{trip} = \bar\ell_k > \gamma \max\big(\min_{j<k} \bar\ell_j,\;
       10^{-3} \ell_0\big).

  Args:
    track: the losses so far (``nan`` before the first refit, and for the
      average after a trip, which restarts it).
    loss: the refit batch's loss now.
    guard: ``γ``, or ``None`` (never trips; the track is still kept).

  Returns:
    ``(trip, track)``.

  Example:
    >>> import jax.numpy as jnp
    >>> nan = jnp.float32(jnp.nan)
    >>> track = LossTrack(nan, nan, nan)
    >>> for loss in (1.0, 0.2, 0.2, 4.0):  # averages 1, .84, .712, 1.37
    ...   trip, track = guard_check(track, jnp.float32(loss), 1.5)
    ...   print(bool(trip), round(float(track.best_refit_loss), 3))
    False 1.0
    False 0.84
    False 0.712
    True 0.712
  """
  loss = loss.astype(jnp.float32)
  first = jnp.where(jnp.isnan(track.first_refit_loss), loss, track.first_refit_loss)
  ema = jnp.where(jnp.isnan(track.refit_loss), loss,
                  LOSS_EMA * track.refit_loss + (1 - LOSS_EMA) * loss)
  best = track.best_refit_loss
  reference = jnp.maximum(best, LOSS_FLOOR * first)
  trip = (jnp.asarray(False) if guard is None
          else ~jnp.isnan(best) & ~(ema <= guard * reference))
  new = LossTrack(ema, jnp.fmin(best, ema), first)
  return trip, new


def stand_down(problem: Problem, preconditioner: PyTree) -> Tuple[PyTree, jax.Array]:
  r"""The identity at its best scale on the refit's samples, and that scale.

  .. math::

     s = \frac{\sum_c g_c^\top x_c}{\sum_c x_c^\top A\, x_c},

  so the step ``−s g`` lowers the quadratic model, like any accepted ``U``.
  It costs ``n_c`` curvature products; the guard calls it when it trips only.
  """
  identity = jax.tree.map(sharding.sharded_like,
                          structures.identity_like(preconditioner), preconditioner)
  s = solvers.best_scale(problem, identity)
  return structures.map_states(lambda cls, st: cls.scale(st, s), identity), s


def hold_until(count: jax.Array, trips: jax.Array, refit_every: int) -> jax.Array:
  """The step count before which refits pause after the ``trips``-th trip:
  ``count + refit_every · 2^(trips − 1)`` (capped at 2³⁰ steps)."""
  hold = jnp.minimum(refit_every * 2.0 ** jnp.clip(trips - 1, 0, 30), 2.0 ** 30)
  return (count + hold.astype(jnp.int32)).astype(jnp.int32)
