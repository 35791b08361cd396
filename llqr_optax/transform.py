r"""The optax transform: ``scale_by_llqr`` and ``llqr``.

``update`` outputs :math:`U(g)`, the gradient preconditioned by the current
structured inverse :math:`U \approx (C + \lambda I)^{-1}`, for the next
transform of the chain. On llqr's schedule (:mod:`llqr_optax.schedule`),
inside the same compiled step, ``U`` is refitted on the current batch by
minimising the LQR objective (:mod:`llqr_optax.fitting`). The update's
stages are the functions of :mod:`llqr_optax.stages`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from llqr_optax import _nnx
from llqr_optax import _validation as validation
from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax import options as options_lib
from llqr_optax import safety
from llqr_optax import schedule
from llqr_optax import sharding as sharding_lib
from llqr_optax import stages
from llqr_optax import structures
from llqr_optax.state import LLQRState

PyTree = Any

def _init_state(options: options_lib.Options, params) -> LLQRState:
  """Identity preconditioners and empty diagnostics."""
  validation.check_params(params)
  max_dim = validation.static_int("max_dim", options.max_dim, 1)
  dense_max = validation.static_int("dense_max", options.dense_max, 1)
  # From the shapes: a leaf wrapped in a pytree node (an nnx Variable) gets
  # its structure state in a plain container, not inside the wrapper.
  precond = structures.init(_nnx.param_shapes(params),
                            _nnx.structure_for(options.structure, params),
                            max_dim=max_dim, dense_max=dense_max)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  i32 = lambda v: jnp.asarray(v, jnp.int32)
  state = LLQRState(
      count=i32(0), preconditioner=precond,
      key=jax.random.PRNGKey(options.seed), damping=f32(options.damping), refits=i32(0),
      skipped_refits=i32(0), skipped_updates=i32(0), objective=f32(jnp.nan),
      output_scale=f32(1.0), reduction_ratio=f32(jnp.nan),
      curvature_scale=f32(jnp.nan if options.relative_damping else 0.0),
      refit_grad_norm=f32(0.0), refit_requested=jnp.asarray(False),
      rejected_refits=i32(0), guard_trips=i32(0), guard_until=i32(0),
      **safety.empty_track()._asdict())
  # Sharded params (FSDP): the state is split like them, never replicated.
  return sharding_lib.shard_like_params(state, params)


def scale_by_llqr(
    *,
    loss: losses_lib.LossLike,
    geometry: geometry_lib.GeometryLike = "ggn",
    structure: structures.StructureSpec = "auto",
    damping: float = 1.0,
    refit_every: int = schedule.DEFAULT_REFIT_EVERY,
    num_chunks: int = 4,
    inner_steps: int = 3,
    inner_solver: str = "pcg",
    ema: float = 0.9,
    adapt_damping: bool = False,
    relative_damping: bool = False,
    refit_growth: Any = "auto",
    normalize: bool = False,
    floor: Any = "auto",
    warmup: bool = True,
    cg_steps: int = 0,
    guard: Optional[float] = options_lib.DEFAULT_GUARD,
    accept: str = "auto",
    max_dim: int = 1024,
    dense_max: int = 4096,
    seed: int = 0,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients with structured inverses fitted by the LQR objective.

  Each parameter leaf gets a structured linear map ``U_l`` (see
  :mod:`llqr_optax.structures`); ``U = blockdiag_l U_l`` is refitted by
  minimising, over gradient samples ``g_c`` of the current batch,

  .. math::

     J(U) = \frac{1}{n_c} \sum_c \Big[ -g_c^\top U g_c
       + \tfrac12 (U g_c)^\top (C + \lambda I) (U g_c) \Big],

  the cost of the layerwise LQR problem whose exact solution is the damped
  step :math:`-(C + \lambda I)^{-1} g` for the geometry's curvature ``C``.
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
    :func:`~llqr_optax.refit_due` (faster on GPUs, which sync on the conditional's
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
    damping: ``λ ≥ 0`` added to the curvature. ``0`` is the authors'
      setting: the undamped ``J`` may be unbounded below along directions of
      zero curvature, so it suits the ``"sgd"`` solver's small steps and a
      ``floor``, not long conjugate-gradient solves.
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
      schedule only; ``"auto"`` is ``None`` here and ``4.0`` for
      :func:`llqr` with a ``learning_rate``, where ``U``'s scale is the
      step's (before Adam, which normalises the step, a growing gradient
      does not make it too long). With ``refit=None`` the refit happens in the same step;
      a two-step loop refits at the next step (:func:`~llqr_optax.refit_due` reads the
      request from the state, and :func:`compile_step` given the same
      ``refit_growth``).
    normalize: scale the output ``U(g)`` by one scalar per refit so that it
      has the size of ``g`` (``output_scale``). The next transform sets the
      step size anyway, and a steady scale keeps Adam's moment estimates valid
      across refits. ``False`` keeps ``U ≈ (C + λI)⁻¹`` as is (a Newton-like
      step at learning rate 1).
    floor: after each refit, the fitted scales of ``"scalar"``,
      ``"diagonal"`` and ``"ekfac"`` preconditioners are raised to at least
      this value, so ``U`` never reverses a gradient coordinate; ``None``
      leaves them free. Matrix factors (Kronecker, dense) have no floor.
      ``"auto"`` is ``1e-8`` (the authors' value) here and in :func:`llqr`
      without a ``learning_rate``, and ``None`` with one: a fitted diagonal
      with negative entries before SGD-momentum diverged on 1 of 5 seeds of
      the MNIST-1D CNN at its tuned rate, floored on none
      (``benchmarks/horizon/run.py``).
    warmup: refit also at steps 1, 2, 4, … below ``refit_every``, the first
      refit from scratch (rescaled by its best scalar, not averaged). With
      ``False``, the authors' schedule: refits at multiples of
      ``refit_every`` only, each averaged by ``ema`` into the current ``U``
      (the identity at first). Pass the same value to :func:`compile_step`
      and :func:`~llqr_optax.refit_due`.
    cg_steps: refine each output by this many steps of conjugate gradients
      on ``(C + λI) x = g`` from ``x₀ = U(g)``, preconditioned by ``U``: the
      continuum from llqr's step (``0``) to the exact damped step
      (:func:`~llqr_optax.scale_by_exact_step`), at one curvature product a
      step on the refit batch (``refit_apply_fn``, e.g. a sub-batch, or the
      training batch).
    guard: llqr stands down where the loss rises while it preconditions:
      when the refit batch's loss, averaged over refits, exceeds ``guard``
      times its lowest value so far and that value by five times its noise,
      at two refits in a row, ``U`` becomes the identity at its best
      scale (the next transform gets the gradient, as without llqr), refits
      pause for ``refit_every · 2^(k−1)`` steps at the ``k``-th time
      (``guard_trips``), then start from scratch. ``None`` turns it off
      (:mod:`llqr_optax.safety`).
    accept: what a fitted ``U`` must pass on the refit's own samples, or the
      previous ``U`` stays (failures count in ``rejected_refits``):
      ``"direction"``, ``−U g`` descends at some positive scale (for ``U``
      before another transform, which sets the step's length);
      ``"scale"``, also ``J(U) < 0`` at ``U``'s own scale, a ``U`` that
      overshoots being scaled to its best scale instead (for ``U`` as the
      step). ``"auto"`` is ``"direction"`` here, and ``"scale"`` in
      :func:`llqr` with a ``learning_rate``.
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
  options = options_lib.resolve(options_lib.from_arguments(locals()))

  def init_fn(params):
    return _init_state(options, params)

  def update_fn(updates, state, params=None, *, apply_fn: Optional[Callable] = None,
                targets: Any = None, full_params: Any = None,
                refit: Optional[bool] = None,
                refit_apply_fn: Optional[Callable] = None,
                refit_targets: Any = None,
                inputs_fn: Optional[Callable[[PyTree], PyTree]] = None,
                **extra_args):
    del extra_args
    batch, state = stages.check_inputs(
        options, updates, state, params, apply_fn=apply_fn, targets=targets,
        full_params=full_params, refit=refit, refit_apply_fn=refit_apply_fn,
        refit_targets=refit_targets, inputs_fn=inputs_fn)
    trigger = stages.refit_trigger(options, state, batch.grads)
    state = stages.maybe_refit(options, state, batch, trigger, refit)
    return stages.precondition_and_guard(options, state, batch)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def llqr(
    *,
    loss: losses_lib.LossLike,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    geometry: geometry_lib.GeometryLike = "ggn",
    structure: structures.StructureSpec = "auto",
    damping: float = 1.0,
    refit_every: int = options_lib.Static(schedule.DEFAULT_REFIT_EVERY),
    num_chunks: int = options_lib.Static(4),
    inner_steps: int = options_lib.Static(3),
    inner_solver: str = "pcg",
    ema: float = 0.9,
    adapt_damping: bool = False,
    relative_damping: bool = False,
    refit_growth: Any = "auto",
    normalize: bool = False,
    floor: Any = "auto",
    warmup: bool = True,
    cg_steps: int = options_lib.Static(0),
    guard: Optional[float] = options_lib.Static(options_lib.DEFAULT_GUARD),
    accept: str = "auto",
    max_dim: int = options_lib.Static(1024),
    dense_max: int = options_lib.Static(4096),
    seed: int = options_lib.Static(0),
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LLQR preconditioning, optionally followed by a learning rate.

  With ``learning_rate=None`` this is :func:`scale_by_llqr`, to chain before
  another optimizer: ``optax.chain(llqr(loss=...), optax.adam(1e-3))``. With a
  learning rate it is a complete optimizer,

  .. math::

     \theta_{t+1} = \theta_t - \eta_t\, U_t(g_t),
     \qquad U_t \approx (C_t + \lambda I)^{-1},

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
    accept: ``"auto"`` is ``"scale"`` with a ``learning_rate`` (``U``'s scale
      is then the step's: a fit with ``J(U) ≥ 0`` is scaled back) and
      ``"direction"`` without (the next transform sets the step's length);
      see :func:`scale_by_llqr`.
    refit_growth: ``"auto"`` is ``4.0`` with a ``learning_rate`` (a
      refit as soon as ``‖g‖`` grows 4× past its value at the last refit:
      without it, ``llqr(learning_rate=1.0)`` on Rosenbrock converges or
      diverges by the rounding of the compiled program) and ``None``
      without; see :func:`scale_by_llqr`.
    loss, geometry, structure, damping, refit_every: as for
      :func:`scale_by_llqr`, to which it is passed on by name.
    num_chunks, inner_steps, inner_solver, ema, adapt_damping: as for
      :func:`scale_by_llqr`, to which it is passed on by name.
    relative_damping, normalize, floor, warmup: as for
      :func:`scale_by_llqr`, to which it is passed on by name.
    cg_steps, guard, max_dim, dense_max, seed, axis_name: as for
      :func:`scale_by_llqr`, to which it is passed on by name.

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
  options = options_lib.from_arguments(locals())
  if learning_rate is not None:  # the "auto" values with a learning rate
    options = options._replace(
        floor=None if options.floor == "auto" else options.floor,
        accept="scale" if options.accept == "auto" else options.accept,
        refit_growth=(options_lib.DEFAULT_REFIT_GROWTH
                      if options_lib.is_auto(options.refit_growth)
                      else options.refit_growth))
  precond = scale_by_llqr(**options._asdict())
  if learning_rate is None:
    return precond
  return optax.chain(precond, optax.scale_by_learning_rate(learning_rate))
