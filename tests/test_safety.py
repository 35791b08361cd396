"""Safe fits (llqr_optax.safety): the acceptance check of a fitted ``U`` and
the guard that stands llqr down where the loss rises.

The acceptance check is tested on problems whose ``J`` is known by hand, then
through the transform (a refit whose warm-started average overshoots the new
batch's model). The guard is tested through the transform: targets that jump
×10 make the refit loss rise past twice its best, and llqr stands down.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llqr_optax
from llqr_optax import fitting, safety, structures

# Two samples of a 2-vector leaf, A = 2I: J(D) = (1/2) Σ_c [-g_cᵀDg_c + (Dg_c)ᵀ(Dg_c)].
G = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
PROBLEM = fitting.Problem(G, lambda v: {"w": 2.0 * v["w"]})


def diagonal(d):
  return {"w": structures.init({"w": jnp.ones(2)}, "diagonal")["w"]._replace(
      diag=jnp.asarray(d, jnp.float32))}


def result_of(d):
  """A refit's result that keeps ``U = diag(d)`` (no step, ``ema = 1``)."""
  return fitting.refit(PROBLEM, diagonal(d), steps=0, ema=1.0)


def test_a_u_that_overshoots_is_scaled_to_its_best_scale():
  result = result_of([3.0, 1.5])  # J = ((-3 + 9) + (-6 + 9)) / 2 = 4.5
  assert float(result.objective) == pytest.approx(4.5)
  assert float(result.linear) == pytest.approx(-4.5)  # a = -(3 + 6) / 2; b = 9
  fixed, failed, keep_old = safety.accept_fit(result, "scale")
  assert bool(failed) and not bool(keep_old)
  # J(sU) = -4.5 s + 9 s²: best at s* = 1/4, J = -4.5² / 36
  np.testing.assert_allclose(fixed.states["w"].diag, [0.75, 0.375], rtol=1e-6)
  assert float(fixed.objective) == pytest.approx(-0.5625, rel=1e-6)
  assert float(fitting.lqr_objective(PROBLEM, fixed.states)) == pytest.approx(
      -0.5625, rel=1e-5)
  assert float(fixed.norm_ratio) == pytest.approx(4 * float(result.norm_ratio),
                                                  rel=1e-6)
  # before another transform only the direction counts: this U descends
  same, failed, keep_old = safety.accept_fit(result, "direction")
  assert not bool(failed) and not bool(keep_old) and same is result


def test_a_u_that_lowers_the_model_passes_untouched():
  result = result_of([0.5, 0.5])  # A⁻¹: J = -(1/4)(1 + 4)/2 < 0
  for accept in safety.ACCEPT:
    fixed, failed, keep_old = safety.accept_fit(result, accept)
    assert not bool(failed) and not bool(keep_old)
    for a, b in zip(jax.tree.leaves(fixed), jax.tree.leaves(result)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("accept", safety.ACCEPT)
def test_a_u_that_climbs_at_every_scale_is_kept_out(accept):
  result = result_of([-1.0, 0.5])  # a = -(-1 + 2) / 2 = -0.5 < 0: descends
  assert not bool(safety.accept_fit(result, accept)[2])
  result = result_of([-1.0, -0.5])  # a = (1 + 2) / 2 > 0: climbs at any s > 0
  _, failed, keep_old = safety.accept_fit(result, accept)
  assert bool(failed) and bool(keep_old)


@pytest.mark.parametrize("accept", safety.ACCEPT)
def test_a_u_that_reverses_a_leaf_is_kept_out(accept):
  """Scalar ``U`` on two leaves, ``A = 2I``, two samples of the base's
  direction ``x_c``: on leaf ``a`` it points against the gradient (as the
  base's direction may at a converged loss), so the fit that lowers ``J``
  most is a negative scale there. ``J`` and its first-order part are
  negative, yet that ``U`` would send leaf ``a``'s later steps uphill: kept
  out."""
  grads = {"a": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "b": jnp.array([[2.0, 0.0], [0.0, 2.0]])}
  inputs = {"a": -0.1 * grads["a"], "b": grads["b"]}
  problem = fitting.Problem(grads, lambda v: jax.tree.map(lambda x: 2.0 * x, v), inputs)
  start = structures.init({"a": jnp.ones(2), "b": jnp.ones(2)}, "scalar")
  result = fitting.refit(problem, start, steps=5, ema=0.0)
  assert float(result.states["a"].scale) < 0 < float(result.states["b"].scale)
  assert float(result.objective) < 0 and float(result.linear) < 0
  assert bool(result.reverses)
  _, failed, keep_old = safety.accept_fit(result, accept)
  assert bool(failed) and bool(keep_old)
  # The same fit without the reversed leaf passes.
  kept = fitting.refit(problem._replace(inputs=dict(inputs, a=grads["a"])), start,
                       steps=5, ema=0.0)
  assert not bool(kept.reverses) and not bool(safety.accept_fit(kept, accept)[2])


def test_accept_fit_names_an_unknown_check():
  with pytest.raises(ValueError, match="accept='size'.*'scale', 'direction'"):
    safety.accept_fit(result_of([1.0, 1.0]), "size")


# --- through the transform ---------------------------------------------------

X = jax.random.normal(jax.random.key(0), (32, 4))
Y = X @ jnp.array([1.0, -2.0, 0.5, 3.0])[:, None]
APPLY = lambda x: (lambda p: x @ p["w"])


def run(tx, inputs, targets):
  """``tx`` on least squares from zero, one step per (inputs, targets): the
  llqr states and the losses before and after each step."""
  params = {"w": jnp.zeros((4, 1))}
  state, states, losses = tx.init(params), [], []
  run.params = []  # the params before each step
  loss = lambda p, x, y: 0.5 * jnp.mean((APPLY(x)(p) - y) ** 2)
  step = jax.jit(lambda p, s, x, y: tx.update(jax.grad(loss)(p, x, y), s, p,
                                              apply_fn=APPLY(x), targets=y))
  for x, y in zip(inputs, targets):
    run.params.append(params)
    out, state = step(params, state, x, y)
    before, params = loss(params, x, y), optax.apply_updates(params, out)
    states.append(llqr_optax.find_state(state))
    losses.append((float(before), float(loss(params, x, y))))
  return states, losses


def test_a_stale_average_that_overshoots_is_scaled_back_and_counted():
  """llqr as the whole optimizer (``accept="scale"``): the inputs grow ×10
  between the first two refits, so the curvature grows ×100 and the average
  (``ema=0.9``) of the old ``U`` with the new fit is far too long a step. It
  is scaled to its best scale, and the step lowers the loss. (The default
  ``refit_growth`` would make that refit a fresh one, with no average.)"""
  tx = llqr_optax.llqr(loss="squared_error", learning_rate=1.0, structure="diagonal",
                       damping=1e-3, ema=0.9, guard=None, refit_growth=None)
  (first, second), losses = run(tx, [X, 10 * X], [Y, 10 * Y])
  assert int(first.rejected_refits) == 0 and float(first.objective) < 0
  assert int(second.refits) == 2 and int(second.rejected_refits) == 1
  assert float(second.objective) < 0
  assert losses[1][1] < losses[1][0]


def test_the_guard_stands_llqr_down_where_the_loss_rises():
  """Refits at steps 0, 2, 4, … (``warmup=False``); the targets jump ×10 from
  step 12. The guard learns the loss's noise from the fifth refit on; the
  average rises far past both bars at the refits of steps 12 (an alarm) and
  14 (the second: a trip). ``U`` becomes the identity at its best scale until
  the next refit (``refit_every · 2⁰`` steps), which starts from scratch at
  ten times the damping."""
  tx = llqr_optax.llqr(loss="squared_error", learning_rate=0.1,
                       structure="diagonal", refit_every=2, warmup=False)
  states, losses = run(tx, [X] * 17, [Y] * 12 + [10 * Y] * 5)
  assert [int(s.guard_alarms) for s in states[10:15]] == [0, 0, 1, 1, 0]
  assert [int(s.guard_trips) for s in states] == [0] * 14 + [1] * 3
  tripped = states[14]
  assert int(tripped.guard_until) == 16
  diag = tripped.preconditioner["w"].diag
  assert float(jnp.max(diag) - jnp.min(diag)) == 0 and float(diag[0, 0]) > 0
  assert np.isnan(float(tripped.refit_loss))  # the average restarts
  assert [int(s.refits) for s in states] == [k // 2 + 1 for k in range(17)]
  # the refit of step 16 starts afresh: its average is its own loss, and its
  # U is the first refit of a new transform there (no average with s·I), at
  # 10x the damping (safety.TRIP_DAMPING per trip)
  assert float(states[16].refit_loss) == pytest.approx(losses[16][0], rel=1e-5)
  assert float(states[16].damping) == pytest.approx(10.0)
  fresh = llqr_optax.llqr(loss="squared_error", learning_rate=0.1,
                          structure="diagonal", refit_every=2, damping=10.0)
  p16 = run.params[16]
  grads = jax.grad(lambda p: 0.5 * jnp.mean((APPLY(X)(p) - 10 * Y) ** 2))(p16)
  _, new = fresh.update(grads, fresh.init(p16), p16, apply_fn=APPLY(X), targets=10 * Y)
  np.testing.assert_allclose(states[16].preconditioner["w"].diag,
                             llqr_optax.find_state(new).preconditioner["w"].diag,
                             rtol=1e-5)


def test_the_guard_backs_off_when_the_loss_stays_high():
  """The targets jump ×10 for good at step 12: after each trip the restarted
  average trips again at its second refit, and each trip holds twice as long
  (refits skipped meanwhile)."""
  tx = llqr_optax.llqr(loss="squared_error", learning_rate=0.5,
                       structure="diagonal", refit_every=2, warmup=False)
  states, _ = run(tx, [X] * 30, [Y] * 12 + [10 * Y] * 18)
  trips = [int(s.guard_trips) for s in states]
  assert trips == [0] * 14 + [1] * 4 + [2] * 6 + [3] * 6
  assert [int(s.guard_until) for s in states[14:]] == [16] * 4 + [22] * 6 + [32] * 6
  # no refit while held: steps 20 (held until 22) and 26, 28 (until 32)
  refit_steps = [k for k in range(1, 30) if states[k].refits > states[k - 1].refits]
  assert refit_steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 22, 24]


def test_without_the_guard_the_rise_goes_unanswered():
  tx = llqr_optax.llqr(loss="squared_error", learning_rate=0.5,
                       structure="diagonal", refit_every=2, warmup=False, guard=None)
  states, _ = run(tx, [X] * 18, [Y] * 12 + [10 * Y] * 6)
  assert int(states[-1].guard_trips) == 0 and int(states[-1].refits) == 9


def guard_run(losses, guard=1.2):
  """The guard over a sequence of refit losses: the refits at which it trips."""
  track, trips = safety.empty_track(), []
  for k, loss in enumerate(losses, 1):
    trip, track = safety.guard_check(track, jnp.float32(loss), guard, refits=k)
    if bool(trip):
      trips.append(k)
      track = track._replace(refit_loss=jnp.float32(jnp.nan),
                             guard_alarms=jnp.int32(0))
  return trips, track


def test_the_guard_ignores_noise_at_a_converged_loss():
  # converged to 1e-8, then noise at 1e-6: a 100-fold rise, far below 10⁻³
  # of the first loss
  trips, track = guard_run([1.0] + [1e-8] * 100 + [1e-6] * 5)
  assert float(track.refit_loss) > 50 * float(track.best_refit_loss)
  assert trips == []


def test_the_guard_ignores_noisy_batch_losses_and_trips_on_a_climb():
  """Batch losses at a fixed level with 30% noise (a batch-32 loss) rise past
  ``1.2×`` their best average often; the noise bar leaves them alone for 500
  refits. The same noise on a loss that climbs 2% a refit from refit 300
  trips within 40 refits; without noise, a 5% climb trips at its sixth refit
  (its average passes 1.2× its best at the fifth)."""
  rng = np.random.default_rng(0)
  noise = np.exp(0.3 * rng.standard_normal(500))
  assert guard_run(noise)[0] == []
  relative_only = []  # the relative bar alone (guard 1.2, two in a row)
  ema = best = None
  for loss in noise:
    ema = loss if ema is None else 0.5 * ema + 0.5 * loss
    relative_only.append(best is not None and ema > 1.2 * best)
    best = ema if best is None else min(best, ema)
  assert sum(a and b for a, b in zip(relative_only, relative_only[1:])) > 10
  climb = noise * np.where(np.arange(500) < 300, 1.0, 1.02 ** (np.arange(500) - 300))
  trips = guard_run(climb)[0]
  assert trips and 300 < trips[0] <= 340
  smooth = [1.0, 0.5] + [0.4] * 20 + [0.4 * 1.05 ** k for k in range(1, 20)]
  assert guard_run(smooth)[0][0] == 22 + 6


@pytest.mark.parametrize("value", [0.5, float("nan"), "2"])
def test_bad_guard_values_are_named(value):
  with pytest.raises(ValueError, match="guard="):
    llqr_optax.llqr(loss="squared_error", guard=value)


def test_bad_accept_values_are_named():
  with pytest.raises(ValueError, match="accept='always'"):
    llqr_optax.scale_by_llqr(loss="squared_error", accept="always")
