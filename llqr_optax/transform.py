"""The optax transform: ``scale_by_llqr`` and ``llqr``.

``update`` outputs :math:`U(g)`, the gradient preconditioned by the current
structured inverse :math:`U \\approx (C + \\lambda I)^{-1}`, for the next
transform of the chain. Every ``refit_every`` steps (and at steps 0, 1, 2, 4,
8, … before that), inside the same compiled step, ``U`` is refitted on the
current batch by minimising the LQR objective (see
:mod:`llqr_optax.fitting`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llqr_optax import fitting
from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax import structures
from llqr_optax._validation import (_check_axis_name, _check_like_params,
                                    _check_number, _check_params, _check_state,
                                    _is_concrete, _param_shapes, _static_int,
                                    _structure_for, _unwrapped)

PyTree = Any

_DEFAULT_REFIT_EVERY = 200

#: Bounds of the adapted damping.
_MIN_DAMPING, _MAX_DAMPING = 1e-8, 1e8


class LLQRState(NamedTuple):
  """State of :func:`scale_by_llqr`: a pytree of arrays, checkpointable.

  Between refits the transform outputs ``c · U(g)`` with the stored
  preconditioner ``U`` and scale ``c``; at a refit ``U`` is refitted to

  .. math::

     J(U) = \\frac{1}{n_c} \\sum_c \\Big[ -g_c^\\top U g_c
       + \\tfrac12 (U g_c)^\\top (C + \\lambda I) (U g_c) \\Big],
     \\qquad
     \\hat\\rho = \\frac{\\ell(\\theta + \\delta) - \\ell(\\theta)}
       {m(\\delta)}, \\quad \\delta = -\\alpha^\\star U \\bar g,

  with :math:`m` the quadratic model and :math:`\\alpha^\\star` its best step
  size along :math:`-U \\bar g` (``objective`` is the first, after the refit;
  ``reduction_ratio`` the second).

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

  Example:
    >>> import jax.numpy as jnp, optax, llqr_optax
    >>> tx = llqr_optax.llqr(loss="squared_error")
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> int(state.refits), int(state.skipped_updates), float(state.damping)
    (0, 0, 1.0)
    >>> bool(jnp.isnan(state.reduction_ratio))  # nan until the first refit
    True

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
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


def _to_f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _refit_due(count, refit_every):
  """Steps 0, 1, 2, 4, 8, … below ``refit_every``, then every ``refit_every``."""
  power_of_two = (count > 0) & ((count & (count - 1)) == 0)
  return (count % refit_every == 0) | (power_of_two & (count < refit_every))


def _scalar(x) -> Any:
  """The one array of a scalar field, unwrapped from any pytree node around
  it (``nnx.Optimizer`` keeps each array in an ``nnx`` Variable)."""
  leaves = jax.tree.leaves(x)
  return leaves[0] if len(leaves) == 1 else x


def refit_due(state_or_step: Any, refit_every: int = _DEFAULT_REFIT_EVERY) -> bool:
  """Whether llqr's schedule refits at this step, as a Python bool.

  The schedule is steps 0, 1, 2, 4, 8, … below ``refit_every``, then every
  ``refit_every`` steps. ``update`` follows it by itself, inside a
  ``lax.cond``; a loop that compiles two steps instead (``refit=True`` and
  ``refit=False``, see :func:`scale_by_llqr`) picks one with this. That is
  faster where conditionals are slow: GPUs wait for the predicate on the host
  at every step, and XLA:CPU runs convolutions inside a conditional many times
  slower than outside one.

  Pass the optimizer state: the step is then llqr's own ``count``, which is
  saved with the state, so a second loop or a run resumed from a checkpoint
  continues the schedule instead of repeating the warm-up refits; an early
  refit requested by ``refit_growth`` is read from it too. Reading
  the count waits for the previous step to finish (a device-to-host copy of
  one integer); the loop needs a Python bool anyway, to pick the step.

  Args:
    state_or_step: an optimizer state holding an :class:`LLQRState` (anything
      :func:`find_state` accepts, e.g. a chain's state or
      ``nnx.Optimizer.opt_state``), or the number of llqr updates made so far
      as an int.
    refit_every: the refit period given to :func:`scale_by_llqr` (the state
      does not hold it: pass it when it is not the default).

  Returns:
    ``True`` at a refit step.

  Raises:
    ValueError: on a negative or non-integer step, ``refit_every < 1``, a
      value traced inside ``jit`` (this runs on the host, between steps), or
      a state without an :class:`LLQRState`.

  Example:
    >>> import jax.numpy as jnp, optax, llqr_optax
    >>> [t for t in range(1000) if llqr_optax.refit_due(t, refit_every=200)]
    [0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 400, 600, 800]
    >>> tx = optax.chain(llqr_optax.llqr(loss="squared_error"), optax.adam(1e-3))
    >>> llqr_optax.refit_due(tx.init({"w": jnp.zeros(3)}))  # count 0
    True
  """
  step, requested = state_or_step, False
  if not isinstance(step, (int, float, np.integer, np.floating, jax.Array,
                           np.ndarray)) and not hasattr(step, "ndim"):
    found = find_state(step)
    step = _scalar(found.count)
    requested = _scalar(found.refit_requested)
  if not _is_concrete(step):
    raise ValueError(
        "refit_due runs on the host, between compiled steps, to pick one; it "
        "got a traced value. Call it outside jax.jit, or inside a compiled "
        "step leave refit=None: update then follows the schedule itself.")
  requested = bool(np.asarray(requested))
  step = _static_int("step", np.asarray(step).item() if hasattr(step, "ndim")
                     else step, 0)
  refit_every = _static_int("refit_every", refit_every, 1)
  return requested or bool(_refit_due(np.int64(step), np.int64(refit_every)))


def scale_by_llqr(
    *,
    loss: losses_lib.LossLike,
    geometry: geometry_lib.GeometryLike = "ggn",
    structure: structures.StructureSpec = "auto",
    damping: float = 1.0,
    refit_every: int = _DEFAULT_REFIT_EVERY,
    num_chunks: int = 4,
    inner_steps: int = 3,
    inner_solver: str = "pcg",
    ema: float = 0.9,
    adapt_damping: bool = False,
    relative_damping: bool = False,
    refit_growth: Optional[float] = None,
    normalize: bool = False,
    max_dim: int = 1024,
    dense_max: int = 4096,
    seed: int = 0,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with structured inverses fitted by the LQR objective.

  Each parameter leaf gets a structured linear map ``U_l`` (see
  :mod:`llqr_optax.structures`); ``U = blockdiag_l U_l`` is refitted by
  minimising, over gradient samples ``g_c`` of the current batch,

  .. math::

     J(U) = \\frac{1}{n_c} \\sum_c \\Big[ -g_c^\\top U g_c
       + \\tfrac12 (U g_c)^\\top (C + \\lambda I) (U g_c) \\Big],

  the cost of the layerwise LQR problem whose exact solution is the damped
  step :math:`-(C + \\lambda I)^{-1} g` for the geometry's curvature ``C``.
  ``C`` is only touched through ``jvp``/``vjp`` products, so cross-layer terms
  that block-diagonal methods drop still shape every ``U_l``.

  ``update(updates, state, params, *, apply_fn, targets=None, **extra)``:

  - ``apply_fn(params) -> outputs`` closes over the current inputs;
  - ``targets`` are the labels (leading axis = examples);
  - unknown extra arguments are ignored; ``full_params`` is needed under
    ``optax.masked``/``multi_transform``;
  - ``refit_apply_fn`` and ``refit_targets`` (optional): refit on another
    batch than the training batch, e.g. a smaller one: a refit's curvature
    products cost in proportion to the refit batch;
  - ``refit=None`` (default) refits on the schedule, inside a ``lax.cond`` of
    the compiled step; a Python bool refits now (``True``) or not, with no
    conditional, for loops that compile two steps and pick one with
    :func:`refit_due` (faster on GPUs, which sync on the conditional's
    predicate, and for conv nets on XLA:CPU).

  Args:
    loss: ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"``,
      ``"squared_error"``, a :class:`~llqr_optax.losses.Loss`, or a callable
      ``loss(outputs, targets) -> scalar`` (a mean over examples).
    geometry: ``"ggn"``, ``"fisher"``, ``"mc_fisher"``, ``"empirical_fisher"``,
      ``"newton"``, ``"renyi"``, ``"reverse_kl"`` or a
      :class:`~llqr_optax.geometry.Geometry`.
    structure: ``"auto"``, ``"scalar"``, ``"diagonal"``, ``"kronecker"``,
      ``"ekfac"``, ``"dense"``, a pytree of names matching params, or a
      callable ``(path, shape) -> name``. ``"auto"`` uses ``"dense"`` for
      leaves of at most :data:`~llqr_optax.structures.AUTO_DENSE_MAX`
      elements, ``"diagonal"`` for other vectors and
      :data:`~llqr_optax.structures.AUTO_MATRIX` for matrices.
    damping: ``λ > 0`` added to the curvature.
    refit_every: refit period in steps (after the warm-up refits at steps 0,
      1, 2, 4, …). A refit costs about ``num_chunks · (inner_steps + 2)``
      curvature products or backward passes, each about one training step
      (``num_chunks · (2 · inner_steps + 4)`` for the two blocks of
      ``"kronecker"``).
    num_chunks: gradient samples per refit (the batch's leading axis is
      split). A batch with fewer rows gives one sample per row:
      ``min(num_chunks, batch)`` chunks, decided when the step is traced.
    inner_steps: inner solver steps per refit and block. Few steps also
      regularise: the fit sees only ``num_chunks`` gradient samples. Three
      suit ``"pcg"``; give ``"cg"`` about 10 and ``"sgd"`` about 50.
    inner_solver: ``"pcg"`` (conjugate gradients preconditioned by each
      structure's own block Hessian inverse, exact line search: in 3 steps it
      fits the diagonal as well as ``"cg"`` in 10, at under half the refit's
      products), ``"cg"`` (plain conjugate gradients) or ``"sgd"`` (momentum
      SGD, lr 1e-3, clip 5, as the paper's code).
    ema: ``β`` of the exponential average of fitted structures across refits.
    adapt_damping: adapt ``damping`` from ``ρ̂`` (Levenberg-Marquardt: ×2/3
      above 0.75, ×3/2 below 0.25).
    relative_damping: ``damping`` is relative to the curvature's scale: at
      each refit ``λ = damping · κ``, with ``κ`` Hutchinson's estimate of
      ``tr(C)/P`` (the mean eigenvalue of ``C``, from four more curvature
      products a refit, kept as ``curvature_scale``), so that one value means
      the same across models and training.
    refit_growth: refit early, off the schedule, when ``‖g‖`` exceeds this
      multiple of its value at the last refit: a preconditioner fitted where
      the curvature was low is far too long a step where it has grown (``U``
      goes stale faster than ``refit_every``). ``None`` refits on the
      schedule only. With ``refit=None`` the refit happens in the same step;
      a two-step loop refits at the next step (:func:`refit_due` reads the
      request from the state).
    normalize: scale the output ``U(g)`` by one scalar per refit so that it
      has the size of ``g`` (``output_scale``). The next transform sets the
      step size anyway, and a steady scale keeps Adam's moment estimates valid
      across refits. ``False`` keeps ``U ≈ (C + λI)⁻¹`` as is (a Newton-like
      step at learning rate 1).
    max_dim: sides above this size use diagonal factors (Kronecker) or the
      identity basis (ekfac); ``"kronecker"``/``"ekfac"`` named for a leaf
      whose two sides both exceed it is a ``ValueError``.
    dense_max: the largest leaf size allowed with ``"dense"``.
    seed: seeds the PRNG key of sampled geometries.
    axis_name: the mapped axis (``pmap``/``shard_map``) the batch is sharded
      over; curvature products and samples are averaged across it. Each
      device splits its own shard into ``num_chunks`` chunks, so sample ``c``
      is the mean over the union of the devices' chunks ``c``. Under ``jit``
      with a sharded batch (``NamedSharding``) leave it ``None``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import llqr_optax
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 2
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> apply = lambda p: x @ p["w"] + p["b"]
    >>> loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    ...     apply(p), y).mean()
    >>> tx = optax.chain(llqr_optax.scale_by_llqr(loss="softmax_cross_entropy"),
    ...                  optax.adam(1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params, apply_fn=apply, targets=y)
    >>> int(state[0].refits)
    1

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  loss_obj = losses_lib.get_loss(loss)
  geometry_obj = geometry_lib.get_geometry(geometry)
  if (geometry_obj.name in ("fisher", "mc_fisher", "renyi", "reverse_kl")
      and loss_obj.distribution is None):
    raise ValueError(
        f"geometry={geometry_obj.name!r} needs the predictive distribution of "
        f"the loss, but loss={loss_obj.name!r} has none (a user callable); use "
        "geometry='ggn', 'newton' or 'empirical_fisher', a built-in loss, or a "
        "llqr_optax.Loss with a distribution.")
  if _is_concrete(seed) and not (isinstance(seed, (int, jnp.integer))
                                 or (hasattr(seed, "dtype")
                                     and jnp.issubdtype(seed.dtype, jnp.integer))):
    raise ValueError(f"seed={seed!r} must be an integer.")
  _check_number("damping", damping, low=0.0, open_low=True,
                fix="The LQR problem is singular without damping; try 1e-3.")
  _check_number("ema", ema, low=0.0, high=1.0, fix="Try 0.9.")
  if _is_concrete(refit_every):
    _static_int("refit_every", refit_every, 1)
  if _is_concrete(inner_steps):
    _static_int("inner_steps", inner_steps, 0)
  if _is_concrete(num_chunks):
    _static_int("num_chunks", num_chunks, 1)
  if inner_solver not in fitting.SOLVERS:
    raise ValueError(f"inner_solver={inner_solver!r} is unknown; choose one of "
                     f"{list(fitting.SOLVERS)}.")
  if isinstance(structure, str) and structure != "auto" and structure not in structures.STRUCTURES:
    raise ValueError(f"structure={structure!r} is unknown; choose one of "
                     f"{['auto'] + list(structures.STRUCTURES)}.")

  def init_fn(params):
    _check_params(params)
    md = _static_int("max_dim", max_dim, 1)
    dm = _static_int("dense_max", dense_max, 1)
    # From the shapes: a leaf wrapped in a pytree node (an nnx Variable) gets
    # its structure state in a plain container, not inside the wrapper.
    precond = structures.init(_param_shapes(params),
                              _structure_for(structure, params), max_dim=md,
                              dense_max=dm)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    return LLQRState(
        count=i32(0), preconditioner=precond,
        key=jax.random.PRNGKey(seed), damping=f32(damping), refits=i32(0),
        skipped_refits=i32(0), skipped_updates=i32(0),
        objective=f32(jnp.nan), output_scale=f32(1.0),
        reduction_ratio=f32(jnp.nan),
        curvature_scale=f32(jnp.nan if relative_damping else 0.0),
        refit_grad_norm=f32(0.0), refit_requested=jnp.asarray(False))

  def update_fn(updates, state, params=None, *, apply_fn: Optional[Callable] = None,
                targets: Any = None, full_params: Any = None,
                refit: Optional[bool] = None,
                refit_apply_fn: Optional[Callable] = None,
                refit_targets: Any = None,
                inputs_fn: Optional[Callable[[PyTree], PyTree]] = None,
                **extra_args):
    del extra_args
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
    _check_params(params)
    _check_like_params(
        "the gradient", updates, params,
        "Pass the gradient of the loss with respect to params as the first "
        "argument of tx.update(grads, state, params, ...).")
    state = _check_state(state, params, structure, max_dim, dense_max, LLQRState)
    if axis_name is not None:
      _check_axis_name(axis_name)
    if (loss_obj.check is not None and targets is not None
        and not hasattr(targets, "dtype")):
      targets = jnp.asarray(targets)  # e.g. a list of labels
    chunks = _static_int("num_chunks", num_chunks, 1)
    if refit_apply_fn is not None and not callable(refit_apply_fn):
      raise ValueError(
          f"refit_apply_fn={refit_apply_fn!r} must be a callable "
          "refit_apply_fn(params) -> outputs closing over the refit batch's "
          "inputs (with refit_targets its labels), or None to refit on the "
          "training batch.")
    if refit_apply_fn is None:
      refit_apply_fn, refit_targets = apply_fn, targets
    elif (loss_obj.check is not None and refit_targets is not None
          and not hasattr(refit_targets, "dtype")):
      refit_targets = jnp.asarray(refit_targets)
    # Leaves wrapped in pytree nodes (the nnx Variables of nnx.split's params)
    # are unwrapped, as in init: llqr works on the bare arrays, and calls
    # apply_fn and returns U(g) in the caller's structures.
    wrapped, out_def = jax.tree.structure(params), jax.tree.structure(updates)
    model_fn = _bare_model_fn(_model_fn(refit_apply_fn, params, full_params),
                              wrapped)
    params, updates = _unwrapped(params), _unwrapped(updates)
    grads_finite = _all_finite(updates)
    if not adapt_damping:
      # λ is the damping argument (optax.inject_hyperparams may change it),
      # not the value stored at init; adapt_damping=True evolves it in state.
      state = state._replace(damping=jnp.asarray(damping, jnp.float32))

    if refit_growth is not None:
      gnorm = jnp.sqrt(fitting.objective.tree_vdot(updates, updates))
      grew = (state.refit_grad_norm > 0) & (gnorm > refit_growth * state.refit_grad_norm)
    else:
      grew = jnp.asarray(False)
    # Off the schedule, for a gradient that grew (now or at the last step).
    off_schedule = grew | state.refit_requested

    def do_refit(state):
      key, sub, probe_key = jax.random.split(state.key, 3)
      problem, _, loss0 = fitting.build_problem(
          model_fn, params, refit_targets, loss=loss_obj, geometry=geometry_obj,
          damping=0.0, num_chunks=chunks, key=sub, axis_name=axis_name)
      if inputs_fn is not None:
        problem = problem._replace(inputs=_to_f32(inputs_fn(problem.grads)))
      # κ = tr(C)/P, four curvature products: the damping's scale with
      # relative_damping; not computed otherwise (curvature_scale stays 0).
      if relative_damping:
        kappa = fitting.curvature_scale(problem.curvature, params, probe_key)
        lam = state.damping * jnp.maximum(kappa, 1e-12)
      else:
        kappa, lam = jnp.zeros((), jnp.float32), state.damping
      problem = fitting.with_damping(problem, lam)
      # Refits that are not finite are never kept, so only a state from
      # outside (a corrupted checkpoint) can hold NaN or Inf: refit from the
      # identity then, as on the first refit.
      healthy = _all_finite(state.preconditioner)
      identity = structures.identity_like(state.preconditioner)
      start = jax.tree.map(lambda s, i: jnp.where(healthy, s, i),
                           state.preconditioner, identity)
      # A refit off the schedule, for a gradient that grew, restarts like the
      # first: the curvature moved, so the old average is no warm start.
      result = fitting.refit(problem, start, steps=inner_steps,
                             solver=inner_solver, ema=ema,
                             first=(state.refits == 0) | ~healthy | off_schedule)
      moved = jax.tree.map(lambda p, d: (p + d.astype(p.dtype)), params, result.step)
      loss1 = loss_obj.fn(model_fn(moved), refit_targets)
      if axis_name is not None:
        loss1 = jax.lax.pmean(loss1, axis_name)
      ratio = (loss1 - loss0) / jnp.where(result.predicted < 0, result.predicted, -1.0)
      ratio = jnp.where(result.predicted < 0, ratio, jnp.nan).astype(jnp.float32)
      ok = (_all_finite(result.states) & jnp.isfinite(result.objective)
            & _all_finite(problem.grads) & _all_finite(problem.samples)
            & (jnp.isfinite(kappa) if relative_damping else True))
      factor = state.damping
      adapted = jnp.where(ratio > 0.75, factor * (2 / 3),
                          jnp.where(ratio < 0.25, factor * 1.5, factor))
      adapted = jnp.clip(jnp.where(jnp.isfinite(ratio), adapted, factor),
                         _MIN_DAMPING, _MAX_DAMPING)
      new_damping = jnp.where(jnp.asarray(adapt_damping), adapted, factor)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      return state._replace(
          preconditioner=keep(result.states, state.preconditioner),
          key=key,
          damping=keep(new_damping.astype(jnp.float32), state.damping),
          refits=state.refits + ok.astype(jnp.int32),
          skipped_refits=state.skipped_refits + (~ok).astype(jnp.int32),
          objective=keep(result.objective.astype(jnp.float32), state.objective),
          output_scale=keep(jnp.where(jnp.asarray(normalize), result.norm_ratio,
                                      1.0).astype(jnp.float32), state.output_scale),
          reduction_ratio=keep(ratio, state.reduction_ratio),
          curvature_scale=keep(kappa.astype(jnp.float32), state.curvature_scale))

    if refit is None:
      due = _refit_due(state.count, refit_every) | off_schedule
      state = jax.lax.cond(due & grads_finite, do_refit, lambda s: s, state)
    elif refit:
      # No conditional: the caller compiled a refit step of its own.
      due = jnp.asarray(True)
      refitted = do_refit(state)
      state = jax.tree.map(lambda n, o: jnp.where(grads_finite, n, o), refitted, state)
    if refit is None or refit:
      # A refit due on a non-finite gradient is skipped too, and counted.
      state = state._replace(skipped_refits=state.skipped_refits
                             + (due & ~grads_finite).astype(jnp.int32))
    if refit_growth is not None:
      refitted_now = due & grads_finite if (refit is None or refit) else jnp.asarray(False)
      state = state._replace(
          refit_grad_norm=jnp.where(refitted_now, gnorm.astype(jnp.float32),
                                    state.refit_grad_norm),
          refit_requested=~refitted_now & (grew | state.refit_requested))
    out = _precondition(state, updates)
    # Nothing that is not finite leaves llqr: a non-finite gradient, or a
    # non-finite U(g) (overflow, or a corrupted state), gives a zero update.
    # Every structure is linear, so NaN or Inf in g propagates to U(g)
    # (0 · Inf = NaN): checking U(g) alone covers both, one pass fewer.
    out_ok = _all_finite(out)
    out = jax.tree.map(lambda u: jnp.where(out_ok, u, jnp.zeros_like(u)), out)
    state = state._replace(
        count=optax.safe_increment(state.count),
        skipped_updates=state.skipped_updates + (~out_ok).astype(jnp.int32))
    return jax.tree.unflatten(out_def, jax.tree.leaves(out)), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def llqr(*, learning_rate: Optional[optax.ScalarOrSchedule] = None,
         **kwargs) -> optax.GradientTransformationExtraArgs:
  """LLQR preconditioning, optionally followed by a learning rate.

  With ``learning_rate=None`` this is :func:`scale_by_llqr`, to chain before
  another optimizer: ``optax.chain(llqr(loss=...), optax.adam(1e-3))``. With a
  learning rate it is a complete optimizer,

  .. math::

     \\theta_{t+1} = \\theta_t - \\eta_t\\, U_t(g_t),
     \\qquad U_t \\approx (C_t + \\lambda I)^{-1},

  where ``U_t`` is the structured inverse last fitted by :func:`scale_by_llqr`
  (``η_t = 1`` and the default damping give a damped Newton-like step).

  Under ``optax.inject_hyperparams(llqr)``, ``damping``, ``ema`` and
  ``learning_rate`` can be schedules; the integer options left at their
  defaults stay static by themselves. An integer option you pass yourself,
  or a callable ``loss`` or ``structure`` (optax would take it for a
  schedule), needs naming in ``static_args``, e.g.
  ``inject_hyperparams(llqr, static_args=("num_chunks",))(num_chunks=8, ...)``.

  Args:
    learning_rate: ``η``, a float or an optax schedule, or ``None``.
    **kwargs: the keyword arguments of :func:`scale_by_llqr`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llqr_optax
    >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 1))
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> apply_fn = lambda p: x @ p["w"]
    >>> tx = llqr_optax.llqr(loss="squared_error", learning_rate=0.5)
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
    >>> updates, state = tx.update(grads, state, params, apply_fn=apply_fn,
    ...                            targets=y)
    >>> params = optax.apply_updates(params, updates)
    >>> float(jnp.mean((apply_fn(params) - y) ** 2)) < 1.0  # the loss fell
    True
    >>> int(llqr_optax.find_state(state).refits)
    1

    A damping schedule, through optax:

    >>> sched = optax.inject_hyperparams(llqr_optax.llqr)(
    ...     loss="squared_error", damping=optax.exponential_decay(1.0, 100, 0.1))
    >>> sorted(sched.init(params).hyperparams)
    ['damping', 'ema']

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  kwargs = {k: v.value if isinstance(v, _Static) else v for k, v in kwargs.items()}
  precond = scale_by_llqr(**kwargs)
  if learning_rate is None:
    return precond
  return optax.chain(precond, optax.scale_by_learning_rate(learning_rate))


class _Static:
  """A default that ``optax.inject_hyperparams`` keeps static.

  ``inject_hyperparams`` binds the factory's signature, fills in its
  defaults, and turns every int or float among them into a traced
  hyperparameter, unless named in ``static_args``. llqr's integer options
  (``num_chunks``, ``inner_steps``, …) shape the compiled program, so their
  defaults are advertised wrapped in this (not an int to optax; its repr is
  the value), and :func:`llqr` unwraps them. Floats (``damping``, ``ema``,
  ``learning_rate``) stay schedulable.
  """
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __repr__(self):
    return repr(self.value)


def _advertised(parameter: inspect.Parameter) -> inspect.Parameter:
  d = parameter.default
  if isinstance(d, int) and not isinstance(d, bool):
    return parameter.replace(default=_Static(d))
  return parameter


# optax.inject_hyperparams binds the factory's signature: expose the keyword
# arguments of scale_by_llqr on llqr, whose own is (learning_rate, **kwargs),
# with the integer defaults static (see _Static).
llqr.__signature__ = inspect.signature(scale_by_llqr).replace(parameters=[
    inspect.Parameter("learning_rate", inspect.Parameter.KEYWORD_ONLY, default=None),
    *map(_advertised, inspect.signature(scale_by_llqr).parameters.values())])


def _precondition(state: LLQRState, tree: PyTree) -> PyTree:
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
               "objective", "reduction_ratio", "damping", "output_scale")


def diagnostics(state: Any, prefix: str = "") -> dict:
  """llqr's diagnostics as a dict of Python floats, for any logger.

  One device-to-host copy of the scalars of the :class:`LLQRState` inside
  ``state``: it waits for the step that made the state, so call it every few
  hundred steps, not at every one, when the loop's speed matters.

  What to look for: ``skipped_refits`` and ``skipped_updates`` stay 0 (each
  counts a refit or an update dropped because something was not finite).
  ``objective`` (``J`` of the averaged ``U`` on the last refit's batch; ``nan``
  before the first refit) starts negative and then hovers around 0, often
  above: the average over refits (``ema``) can overshoot on one batch's
  model. ``reduction_ratio`` (``ρ̂``, the loss change over the quadratic
  model's, at the best-scaled step of the last refit) near or somewhat above
  1 means the model predicts the loss well; below 0 the step the model
  predicts to lower the loss raised it (more damping, or
  ``adapt_damping=True``). The README's "Logging" recipe quotes the values
  ``make demo`` measures.

  Args:
    state: an optimizer state holding an :class:`LLQRState` (anything
      :func:`find_state` accepts).
    prefix: prepended to every key, e.g. ``"llqr/"``.

  Returns:
    ``{prefix + name: float}`` for ``count``, ``refits``, ``skipped_refits``,
    ``skipped_updates``, ``objective``, ``reduction_ratio``, ``damping`` and
    ``output_scale`` (counters too are floats, so every logger takes them).

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
  values = jax.device_get([_scalar(getattr(found, name)) for name in DIAGNOSTICS])
  return {prefix + name: float(np.asarray(v)) for name, v in zip(DIAGNOSTICS, values)}


def precondition(state: Any, tree: PyTree) -> PyTree:
  """Applies the current preconditioner ``U`` of an llqr state to ``tree``.

  .. math::

     v \\mapsto c \\cdot U(v) = c \\cdot \\operatorname{blockdiag}_l(U_l)\\, v,

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

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  bare = _precondition(find_state(state), _unwrapped(tree))
  return jax.tree.unflatten(jax.tree.structure(tree), jax.tree.leaves(bare))
