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
previous ``U`` stays. So is, under either check and where no ``floor``
bounds ``U``'s scales, a ``U`` that turns some leaf's samples around,
:math:`\sum_c x_c^\top U x_c < 0` over that leaf (``RefitResult.reverses``):
it can lower ``J`` on the refit's own samples (at a converged loss the base's
direction ``x_c`` may point against the noise ``g_c``, and the fitted scale
comes out negative), but it would reverse the leaf's later steps; in
``precondition_base(adam)`` on optax's mixed contract target, one such fit (a
scalar ``U`` of −28) threw a converged coordinate from 2 to −34.
Every failed check counts in ``rejected_refits``.

**Guard** (:func:`guard_check`). ``J`` is the model of one step of ``−U g``;
it cannot see what the next transform does with ``U g`` (Adam normalises each
coordinate, so a ``U`` that mixes coordinates can climb while ``J`` is
negative), nor the many steps one ``U`` serves. The loss can: the refit
batch's loss, averaged over refits (``refit_loss``, an EMA with ``β = ½``),
is compared with its lowest value so far. The guard raises an alarm when the
average exceeds ``guard`` times that (and ``10⁻³`` of the first refit's loss,
so that noise at a converged loss never counts) *and* exceeds it by more than
``NOISE_SIGMAS`` (6) standard deviations of the average's noise, which it
learns from the refit losses' differences (``refit_loss_noise``, from the
fifth refit on, at refits that raise no alarm): a noisy loss needs a larger
rise. Two alarms in a row trip it, and llqr stands down: ``U`` becomes the
identity at its best scale (the next transform gets the gradient, as without
llqr), refits pause for ``refit_every · 2^(k−1)`` steps at the ``k``-th trip
(``guard_trips``), and the next refit starts from scratch, with
``TRIP_DAMPING`` (10) times the damping after each trip: a trust region that
shrinks, pulling later fits toward a scaled identity (without it, the autoencoder of
``benchmarks/training/safe_sweep.py`` at damping 0.01 and Adam's rate 3e-2
tripped 6 times and ended at 2.7× Adam's loss).

Why both bars. A relative bar alone must choose between reacting and
ignoring noise. ``guard=1.2`` over an average with ``β = ½`` holds every row
of that sweep (damping 0.1 and 0.01, Adam's rates 1e-3 to 3e-2) near Adam's
loss, where ``1.5`` over ``β = 0.8`` (the guard of 0.1.0) let the
damping-0.01 runs at 1e-2 and 3e-2 drift to 1.6× and 2.2× before tripping,
too late; but the relative bar alone trips on the noise of batch-32 losses
(4 times in 300 steps on ``tests/test_reliability.py``'s MLP, whose noisy
average dips 20% below its mean). The noise bar and the second alarm leave
those runs alone: replayed on refit losses recorded with the guard off, the
rule comes within 0.87 of tripping on the batch-32 runs (0.99 for the guard
of 0.1.0) and still trips the sweep's climbing runs one refit after the
relative bar alone.
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
#: ``β`` of the guard's average of the refit losses over refits.
LOSS_EMA = 0.5
#: ``β`` of the average of the squared differences of successive refit
#: losses, from which the guard learns the noise of its average.
NOISE_EMA = 0.9
#: How many standard deviations of its noise the average must rise past its
#: best before the guard raises an alarm.
NOISE_SIGMAS = 6.0
#: The refits before the guard learns the noise (their losses fall fastest:
#: their differences are the descent, not noise) and before it can trip.
GUARD_WARMUP = 4
#: Alarms in a row that trip the guard.
GUARD_ALARMS = 2


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
    failed; and whether no positive scale makes ``U`` descend (``a ≥ 0``) or
    ``U`` turns some leaf's samples around (``result.reverses``), so that the
    previous ``U`` must stay.

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
  descends = (a < 0) & ~jnp.asarray(result.reverses)
  if accept == "direction":
    return result, ~descends, ~descends
  failed = ~(result.objective < 0) | ~descends
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
  last_refit_loss: jax.Array
  refit_loss_noise: jax.Array
  guard_alarms: jax.Array


def empty_track() -> LossTrack:
  """The track before the first refit."""
  nan = jnp.full((), jnp.nan, jnp.float32)
  return LossTrack(nan, nan, nan, nan, jnp.zeros((), jnp.float32),
                   jnp.zeros((), jnp.int32))


def guard_check(track: LossTrack, loss: jax.Array, guard: Any, refits: Any
                ) -> Tuple[jax.Array, LossTrack]:
  r"""Whether the averaged refit loss rose past both bars twice in a row.

  With :math:`\ell_k` the ``k``-th refit's loss, ``β = ½`` (:data:`LOSS_EMA`)
  and ``β_v = 0.9`` (:data:`NOISE_EMA`):

  .. math::

     \bar\ell_k = \beta \bar\ell_{k-1} + (1 - \beta) \ell_k, \qquad
     v_k = \beta_v v_{k-1} + (1 - \beta_v) (\ell_k - \ell_{k-1})^2, \\
     r_k = \max\big(\min_{j<k} \bar\ell_j,\; 10^{-3} \ell_0\big), \qquad
     \sigma_{k-1} = \sqrt{\tfrac{v_{k-1}}{2} \tfrac{1 - \beta}{1 + \beta}}, \\
     \text{alarm}_k = \bar\ell_k > \gamma\, r_k \;\wedge\;
       \bar\ell_k > r_k + 6\, \sigma_{k-1} ,

  where ``σ`` is the standard deviation of the average for losses with
  independent noise of variance ``v/2``. ``v`` is learnt from the
  :data:`GUARD_WARMUP` + 1-th refit on (``v`` starts at that refit's squared
  difference; no alarm until the refit after it), at refits that raise no
  alarm (a jump is not noise: learnt, it would hide the rise that follows).
  Two alarms in a row trip the guard.

  Args:
    track: the losses so far (:func:`empty_track` before the first refit;
      ``refit_loss`` is ``nan`` after a trip, which restarts the average).
    loss: the refit batch's loss now.
    guard: ``γ``, or ``None`` (never trips; the track is still kept).
    refits: the refits so far, this one included.

  Returns:
    ``(trip, track)``.

  Example:
    >>> import jax.numpy as jnp
    >>> track = empty_track()
    >>> losses = [1.0, 0.5, 0.4, 0.3, 0.3, 0.31, 0.29, 0.3, 0.6, 0.9]
    >>> for k, loss in enumerate(losses, 1):
    ...   trip, track = guard_check(track, jnp.float32(loss), 1.2, refits=k)
    ...   print(k, int(track.guard_alarms), bool(trip))  # doctest: +ELLIPSIS
    1 0 False
    ...
    8 0 False
    9 1 False
    10 2 True
  """
  loss = loss.astype(jnp.float32)
  first = jnp.where(jnp.isnan(track.first_refit_loss), loss, track.first_refit_loss)
  ema = jnp.where(jnp.isnan(track.refit_loss), loss,
                  LOSS_EMA * track.refit_loss + (1 - LOSS_EMA) * loss)
  best = track.best_refit_loss
  reference = jnp.maximum(best, LOSS_FLOOR * first)
  noise = track.refit_loss_noise
  sigma = jnp.sqrt(noise / 2 * (1 - LOSS_EMA) / (1 + LOSS_EMA))
  alarm = (jnp.asarray(False) if guard is None
           else (refits > GUARD_WARMUP + 1) & (ema > guard * reference)
           & (ema > reference + NOISE_SIGMAS * sigma))
  alarms = jnp.where(alarm, track.guard_alarms + 1, 0).astype(jnp.int32)
  diff2 = (loss - track.last_refit_loss) ** 2
  learnt = jnp.where(refits == GUARD_WARMUP + 1, diff2,
                     NOISE_EMA * noise + (1 - NOISE_EMA) * diff2)
  noise = jnp.where((refits > GUARD_WARMUP) & ~alarm & jnp.isfinite(diff2), learnt, noise)
  new = LossTrack(ema, jnp.fmin(best, ema), first, loss, noise, alarms)
  return alarms >= GUARD_ALARMS, new


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
