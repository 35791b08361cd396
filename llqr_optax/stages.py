r"""The stages of one llqr update, each a function with one job.

:func:`~llqr_optax.scale_by_llqr`'s ``update`` reads as four stages::

    batch, state = check_inputs(options, grads, state, params, ...)
    trigger = refit_trigger(options, state, batch.grads)
    state = maybe_refit(options, state, batch, trigger, refit)
    return precondition_and_guard(options, state, batch)

(with ``cg_steps``, stage 4 first refines ``U(g)`` toward the exact damped
step: :func:`refine_by_cg`), and a refit (:func:`refit_state`) as six: build
the problem on the refit batch, set its damping, fit ``U``, measure ``ρ̂``,
keep the result only if every part of it is finite and ``U`` passes its
check, and let the guard read the loss (:mod:`llqr_optax.safety`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llqr_optax import _nnx
from llqr_optax import _validation as validation
from llqr_optax import damping as damping_lib
from llqr_optax import fitting
from llqr_optax import geometry as geometry_lib
from llqr_optax import safety
from llqr_optax import schedule
from llqr_optax import state as state_lib
from llqr_optax import structures
from llqr_optax._conv_layout import canonical_convolutions
from llqr_optax.exact import quality as exact_quality
from llqr_optax.options import Options
from llqr_optax.state import LLQRState

PyTree = Any


class Batch(NamedTuple):
  """What one update works on, with the caller's wrappers removed."""
  grads: PyTree          # bare arrays
  params: PyTree         # bare arrays
  model_fn: Callable     # bare params -> outputs on the refit batch
  targets: Any           # the refit batch's targets
  inputs_fn: Optional[Callable]  # samples -> the inputs U is fitted on
  out_def: Any           # the caller's tree structure of the output


class Trigger(NamedTuple):
  """Why a refit may happen off the schedule (``refit_growth``)."""
  grad_norm: jax.Array
  off_schedule: jax.Array


def _to_f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _model_fn(apply_fn, params, full_params):
  """``apply_fn`` as a function of ``params``, which may be a masked subtree."""
  if not any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked)):
    return apply_fn
  if full_params is None:
    raise ValueError(
        "llqr runs under optax.masked or optax.multi_transform: the params it "
        "receives are a masked subtree, so it cannot call apply_fn on them. "
        "Pass the full params as an extra argument: tx.update(grads, state, "
        "params, apply_fn=..., targets=..., full_params=params).")

  def merged(sub):
    full = jax.tree.map(lambda f, s: f if _is_masked(s) else s, full_params, sub,
                        is_leaf=_is_masked)
    return apply_fn(full)
  return merged


def _bare_model_fn(model_fn, wrapped):
  """``model_fn`` of the bare params when the caller's are wrapped leaves."""
  def bare(p):
    if jax.tree.structure(p) == wrapped:
      return model_fn(p)
    return model_fn(jax.tree.unflatten(wrapped, jax.tree.leaves(p)))
  return bare


def _check_call(refit, apply_fn, params, refit_apply_fn):
  """The update's own arguments, before anything is traced."""
  if refit is not None and not isinstance(refit, (bool, np.bool_)):
    raise ValueError(
        f"refit={refit!r} must be None (refit on llqr's schedule, decided "
        "inside the compiled step) or a Python bool (refit now or not; "
        "compile one step per value, e.g. with static_argnames, and pick it "
        "with llqr_optax.refit_due(opt_state, refit_every)).")
  if apply_fn is None or not callable(apply_fn):
    raise ValueError(
        f"apply_fn={apply_fn!r}: llqr needs apply_fn(params) -> outputs, "
        "closing over the batch's inputs, as a keyword argument: "
        "tx.update(grads, state, params, apply_fn=..., targets=...).")
  if params is None:
    raise ValueError("params=None: llqr needs the current params: "
                     "tx.update(grads, state, params, apply_fn=..., ...).")
  validation.check_params(params)
  if refit_apply_fn is not None and not callable(refit_apply_fn):
    raise ValueError(
        f"refit_apply_fn={refit_apply_fn!r} must be a callable "
        "refit_apply_fn(params) -> outputs closing over the refit batch's "
        "inputs (with refit_targets its labels), or None to refit on the "
        "training batch.")


def _as_targets(options: Options, targets):
  """Targets given as a Python list become an array for the loss's check."""
  if (options.loss.check is not None and targets is not None
      and not hasattr(targets, "dtype")):
    return jnp.asarray(targets)
  return targets


def check_inputs(options: Options, grads, state, params, *, apply_fn, targets,
                 full_params, refit, refit_apply_fn, refit_targets,
                 inputs_fn) -> tuple[Batch, LLQRState]:
  """Stage 1: checks the update's inputs and unwraps them into a :class:`Batch`.

  Leaves wrapped in pytree nodes (the nnx Variables of ``nnx.split``'s
  params) are unwrapped, as in ``init``: llqr works on the bare arrays, calls
  ``apply_fn`` and returns ``U(g)`` in the caller's structures. ``λ`` is the
  ``damping`` option (``optax.inject_hyperparams`` may change it), times
  :data:`~llqr_optax.safety.TRIP_DAMPING` per guard trip, unless
  ``adapt_damping`` evolves it in the state.
  """
  _check_call(refit, apply_fn, params, refit_apply_fn)
  validation.check_like_params(
      "the gradient", grads, params,
      "Pass the gradient of the loss with respect to params as the first "
      "argument of tx.update(grads, state, params, ...).")
  state = validation.check_state(state, params, options.structure,
                                 options.max_dim, options.dense_max)
  if options.axis_name is not None:
    validation.check_axis_name(options.axis_name)
  targets = _as_targets(options, targets)
  validation.static_int("num_chunks", options.num_chunks, 1)
  if refit_apply_fn is None:
    refit_apply_fn, refit_targets = apply_fn, targets
  else:
    refit_targets = _as_targets(options, refit_targets)
  wrapped = jax.tree.structure(params)
  model_fn = _bare_model_fn(_model_fn(refit_apply_fn, params, full_params), wrapped)
  if not options.adapt_damping:
    state = state._replace(damping=safety.tripped_damping(
        jnp.asarray(options.damping, jnp.float32), state.guard_trips))
  batch = Batch(grads=_nnx.unwrapped(grads), params=_nnx.unwrapped(params),
                model_fn=model_fn, targets=refit_targets, inputs_fn=inputs_fn,
                out_def=jax.tree.structure(grads))
  return batch, state


def refit_trigger(options: Options, state: LLQRState, grads: PyTree) -> Trigger:
  """Stage 2: whether the gradient grew past ``refit_growth`` (now or at the
  last step), which refits off the schedule."""
  if options.refit_growth is None:
    return Trigger(jnp.zeros((), jnp.float32), state.refit_requested)
  gnorm = jnp.sqrt(fitting.objective.tree_vdot(grads, grads))
  grew = ((state.refit_grad_norm > 0)
          & (gnorm > options.refit_growth * state.refit_grad_norm))
  return Trigger(gnorm, grew | state.refit_requested)


def maybe_refit(options: Options, state: LLQRState, batch: Batch,
                trigger: Trigger, refit: Optional[bool]) -> LLQRState:
  """Stage 3: refits when due and the gradient is finite.

  ``refit=None`` decides inside the compiled step (a ``lax.cond``); a Python
  bool refits now or not, with no conditional. A refit due on a gradient that
  is not finite is skipped and counted.
  """
  grads_finite = _all_finite(batch.grads)
  # After a guard trip refits pause until ``guard_until`` (module safety).
  live = grads_finite & (state.count >= state.guard_until)
  do_refit = lambda s: refit_state(options, s, batch, trigger.off_schedule)
  if refit is None:
    due = (schedule.due(state.count, options.refit_every, options.warmup)
           | trigger.off_schedule)
    state = jax.lax.cond(due & live, canonical_convolutions(do_refit),
                         lambda s: s, state)
  elif refit:
    due = jnp.asarray(True)
    refitted = do_refit(state)
    state = jax.tree.map(lambda n, o: jnp.where(live, n, o), refitted, state)
  else:
    due = jnp.asarray(False)
  if refit is None or refit:
    state = state._replace(skipped_refits=state.skipped_refits
                           + (due & ~grads_finite).astype(jnp.int32))
  if options.refit_growth is not None:
    refitted_now = due & live
    state = state._replace(
        refit_grad_norm=jnp.where(refitted_now, trigger.grad_norm.astype(jnp.float32),
                                  state.refit_grad_norm),
        refit_requested=~refitted_now & trigger.off_schedule)
  return state


def refine_by_cg(options: Options, state: LLQRState, batch: Batch, u: PyTree) -> PyTree:
  r"""Stage 4a: ``cg_steps`` of conjugate gradients on ``(C + λI) x = g``.

  Started at llqr's output :math:`x_0 = c\,U(g)` and preconditioned by
  :math:`c\,U`: zero steps are llqr's step, many the exact damped step
  (:func:`~llqr_optax.exact.cg`). The products are those of the refit batch
  (``refit_apply_fn``, e.g. a sub-batch, or the training batch), one per step.
  """
  key = jax.random.fold_in(jnp.asarray(state.key), state.count)
  lin = geometry_lib.linearize(batch.model_fn, batch.params, batch.targets,
                               loss=options.loss, geometry=options.geometry, key=key)
  matvec = lambda v: lin.matvec(v, state.damping)
  if options.axis_name is not None:
    matvec = lambda v, mv=matvec: jax.lax.pmean(mv(v), options.axis_name)
  like = lambda tree: jax.tree.map(lambda x, p: x.astype(p.dtype), tree, batch.params)
  return exact_quality.cg(matvec, like(batch.grads), tol=None,
                          max_steps=options.cg_steps, x0=like(u),
                          preconditioner=lambda r: like(state_lib.scaled_apply(state, r))).step


def precondition_and_guard(options: Options, state: LLQRState, batch: Batch):
  """Stage 4: ``c · U(g)`` (refined by :func:`refine_by_cg` with ``cg_steps``),
  zeroed (and counted) unless every entry is finite.

  Every structure is linear, so NaN or Inf in ``g`` propagates to ``U(g)``
  (``0 · Inf = NaN``): checking ``U(g)`` alone covers both, one pass fewer.
  """
  out = state_lib.scaled_apply(state, batch.grads)
  if options.cg_steps:
    refined = refine_by_cg(options, state, batch, out)
    out = jax.tree.map(lambda r, u: r.astype(u.dtype), refined, out)
  out_ok = _all_finite(out)
  out = jax.tree.map(lambda u: jnp.where(out_ok, u, jnp.zeros_like(u)), out)
  state = state._replace(
      count=optax.safe_increment(state.count),
      skipped_updates=state.skipped_updates + (~out_ok).astype(jnp.int32))
  return jax.tree.unflatten(batch.out_def, jax.tree.leaves(out)), state


def build_refit_problem(options: Options, batch: Batch, key: jax.Array):
  """Refit stage 1: the gradient samples and curvature products of the batch,
  undamped, and the loss there."""
  problem, _, loss = fitting.build_problem(
      batch.model_fn, batch.params, batch.targets, loss=options.loss,
      geometry=options.geometry, damping=0.0,
      num_chunks=validation.static_int("num_chunks", options.num_chunks, 1), key=key,
      axis_name=options.axis_name)
  if batch.inputs_fn is not None:
    problem = problem._replace(inputs=_to_f32(batch.inputs_fn(problem.grads)))
  return problem, loss


def fit_preconditioner(options: Options, problem: fitting.Problem,
                       state: LLQRState, off_schedule) -> fitting.RefitResult:
  """Refit stage 3: the warm-started fit of ``U``.

  Refits that are not finite are never kept, so only a state from outside (a
  corrupted checkpoint) can hold NaN or Inf: the fit starts from the identity
  then, as on the first refit. A refit off the schedule, for a gradient that
  grew, restarts like the first: the curvature moved, so the old average is
  no warm start; so does the first refit after the guard stood llqr down.
  Without ``warmup`` the first refit, like every other, is averaged into the
  current ``U`` (the identity), as in the authors' code.
  """
  healthy = _all_finite(state.preconditioner)
  identity = structures.identity_like(state.preconditioner)
  start = jax.tree.map(lambda s, i: jnp.where(healthy, s, i),
                       state.preconditioner, identity)
  restart = (state.guard_trips > 0) & jnp.isnan(state.refit_loss)  # after a trip
  return fitting.refit(problem, start, steps=options.inner_steps,
                       solver=options.inner_solver, ema=options.ema,
                       first=(((state.refits == 0) & options.warmup) | ~healthy
                              | off_schedule | restart))


def measure_reduction_ratio(options: Options, batch: Batch, loss_before,
                            result: fitting.RefitResult) -> jax.Array:
  """Refit stage 4: ``ρ̂`` at the fit's best-scaled step (one forward pass)."""
  moved = jax.tree.map(lambda p, d: p + d.astype(p.dtype), batch.params, result.step)
  loss_after = options.loss.fn(batch.model_fn(moved), batch.targets)
  if options.axis_name is not None:
    loss_after = jax.lax.pmean(loss_after, options.axis_name)
  return damping_lib.reduction_ratio(loss_before, loss_after, result.predicted)


def keep_if_finite(state: LLQRState, ok: jax.Array, counted: bool = True,
                   **new) -> LLQRState:
  """Refit stage 5: the new fields where ``ok``, the old ones otherwise; the
  refit counted as done or skipped (unless ``counted=False``)."""
  keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o)
  kept = {name: keep(value, getattr(state, name)) for name, value in new.items()}
  if not counted:
    return state._replace(**kept)
  return state._replace(**kept, refits=state.refits + ok.astype(jnp.int32),
                        skipped_refits=state.skipped_refits + (~ok).astype(jnp.int32))


def refit_state(options: Options, state: LLQRState, batch: Batch,
                off_schedule) -> LLQRState:
  """One refit of the state on the batch: build, damp, fit, ``ρ̂``, keep
  (the fit checked by :func:`~llqr_optax.safety.accept_fit`), guard."""
  key, sub, probe_key = jax.random.split(state.key, 3)
  problem, loss_before = build_refit_problem(options, batch, sub)
  kappa, lam = damping_lib.refit_damping(
      state.damping, problem.curvature, batch.params, probe_key,
      relative=options.relative_damping)
  problem = fitting.with_damping(problem, lam)
  result = fit_preconditioner(options, problem, state, off_schedule)
  ratio = measure_reduction_ratio(options, batch, loss_before, result)
  ok = (_all_finite(result.states) & jnp.isfinite(result.objective)
        & _all_finite(problem.grads) & _all_finite(problem.samples)
        & (jnp.isfinite(kappa) if options.relative_damping else True))
  new_damping = jnp.where(jnp.asarray(options.adapt_damping),
                          damping_lib.levenberg_marquardt(state.damping, ratio),
                          state.damping)
  if options.floor is not None:
    # The floor raises the scales it bounds to at least floor > 0 after the
    # check: nothing it bounds can reverse, so the check is the floor's.
    result = result._replace(reverses=jnp.bool_(False))
  result, rejected, keep_old = safety.accept_fit(result, options.accept)
  scale = jnp.where(jnp.asarray(options.normalize), result.norm_ratio, 1.0)
  states = (result.states if options.floor is None
            else structures.floor(result.states, options.floor))
  old = lambda new, prev: jax.tree.map(lambda n, p: jnp.where(keep_old, p, n), new, prev)
  state = state._replace(key=key)
  state = keep_if_finite(
      state, ok, preconditioner=old(states, state.preconditioner),
      damping=new_damping.astype(jnp.float32),
      objective=result.objective.astype(jnp.float32),
      output_scale=old(scale.astype(jnp.float32), state.output_scale),
      reduction_ratio=ratio, curvature_scale=kappa.astype(jnp.float32),
      rejected_refits=state.rejected_refits + rejected.astype(jnp.int32))
  return guard_loss(options, state, problem, loss_before, ok)


def guard_loss(options: Options, state: LLQRState, problem: fitting.Problem,
               loss, ok) -> LLQRState:
  """Refit stage 6: the guard (:func:`~llqr_optax.safety.guard_check`) reads
  the refit batch's loss; where its average rose past ``guard`` times its best
  and past its noise, twice in a row, ``U`` becomes the identity at its best
  scale, refits pause, and the damping of the fits after it grows by
  :data:`~llqr_optax.safety.TRIP_DAMPING`."""
  track = safety.LossTrack(*(getattr(state, name) for name in safety.LossTrack._fields))
  trip, new = safety.guard_check(track, loss, options.guard, refits=state.refits)
  ok = ok & jnp.isfinite(loss)
  state = keep_if_finite(state, ok, counted=False, **new._asdict())

  def stand_down(s):
    precond, c = safety.stand_down(problem, s.preconditioner)
    trips = s.guard_trips + 1
    scale = jnp.where(jnp.asarray(options.normalize), 1.0 / c, 1.0)
    damping = jnp.where(jnp.asarray(options.adapt_damping),
                        safety.tripped_damping(s.damping, 1), s.damping)
    return s._replace(
        preconditioner=precond, output_scale=scale.astype(jnp.float32),
        guard_trips=trips, damping=damping, refit_loss=jnp.full((), jnp.nan, jnp.float32),
        guard_alarms=jnp.zeros((), jnp.int32),
        guard_until=safety.hold_until(s.count, trips, options.refit_every))
  return jax.lax.cond(trip & ok, canonical_convolutions(stand_down), lambda s: s,
                      state)
