r"""The exact damped step as an optax transform: ``(C + λI)⁻¹ g`` by CG, every step.

.. math::

   u_t = \operatorname{CG}_{k}\big(C_t + \lambda I,\; g_t\big)
   \approx (C_t + \lambda I)^{-1} g_t ,

``k`` conjugate-gradient iterations (``k`` curvature products) on the current
batch, for the next transform of a chain:
``optax.chain(scale_by_exact_step(loss=...), optax.sgd(lr))`` is the damped
Gauss-Newton (or Fisher, Newton, …) step, the ceiling llqr's preconditioners
approximate at a fraction of its cost. ``per_leaf=True`` solves each
parameter array's diagonal block of ``C`` only (the ideal block-diagonal
preconditioner, K-FAC's ceiling; one product per leaf per iteration).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax.exact import quality

PyTree = Any


class ExactStepState(NamedTuple):
  """State of :func:`scale_by_exact_step`.

  Attributes:
    count: updates made.
    solution: the last solution (the warm start), or ``()`` without warm start.
    residual: the last solve's relative residual ``‖(C + λI)u − g‖ / ‖g‖``.
    skipped_updates: updates zeroed because the gradient or the solution was
      not finite.
  """
  count: jax.Array
  solution: Any
  residual: jax.Array
  skipped_updates: jax.Array


def scale_by_exact_step(*, loss: losses_lib.LossLike,
                        geometry: geometry_lib.GeometryLike = "ggn",
                        damping: Union[float, jax.Array] = 1e-3, cg_steps: int = 10,
                        per_leaf: bool = False, warm_start: bool = False,
                        axis_name: Optional[str] = None
                        ) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions the gradient by the damped curvature, solved by CG each step.

  ``update(grads, state, params, *, apply_fn, targets=None, **extra)`` takes
  the model like :func:`~llqr_optax.scale_by_llqr` (``apply_fn(params)``
  closing over the batch's inputs, ``targets`` its labels) and returns
  :math:`u \approx (C + \lambda I)^{-1} g` after ``cg_steps`` iterations
  (a step costs a forward pass and ``cg_steps`` curvature products,
  ``cg_steps · P`` with ``per_leaf`` and ``P`` leaves). A non-finite gradient
  or solution gives a zero update, counted.

  Args:
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a geometry name or :class:`~llqr_optax.geometry.Geometry`.
    damping: ``λ > 0``.
    cg_steps: CG iterations per step.
    per_leaf: solve the per-leaf diagonal blocks of ``C`` only.
    warm_start: start CG from the previous step's solution instead of zero.
    axis_name: the mapped axis the batch is sharded over (``pmap``/
      ``shard_map``): products are averaged across it. Under ``jit`` with a
      sharded batch leave it ``None``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llqr_optax
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 3.0]]), jnp.ones(2)
    >>> params = {"w": jnp.zeros(2)}
    >>> apply_fn = lambda p: x @ p["w"]
    >>> tx = llqr_optax.scale_by_exact_step(loss="squared_error", damping=1e-6,
    ...                                     cg_steps=2)
    >>> g = jax.grad(lambda p: 0.25 * jnp.sum((apply_fn(p) - y) ** 2))(params)
    >>> u, state = tx.update(g, tx.init(params), params, apply_fn=apply_fn, targets=y)
    >>> [round(float(v), 3) for v in u["w"]]  # −(Newton step): w* = (1, 1/3)
    [-1.0, -0.333]
  """
  geometry_lib.check_damping(damping, allow_zero=False)
  loss = losses_lib.get_loss(loss)

  def init_fn(params):
    return ExactStepState(
        count=jnp.zeros((), jnp.int32),
        solution=jax.tree.map(jnp.zeros_like, params) if warm_start else (),
        residual=jnp.zeros((), jnp.float32),
        skipped_updates=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, apply_fn: Optional[Callable] = None,
                targets: Any = None, **extra):
    del extra
    if apply_fn is None or params is None:
      raise ValueError(
          f"scale_by_exact_step needs params and apply_fn (got params={params!r:.40}, "
          f"apply_fn={apply_fn!r}): tx.update(grads, state, params, "
          "apply_fn=lambda p: model.apply(p, x), targets=y).")
    lin = geometry_lib.linearize(apply_fn, params, targets, loss=loss, geometry=geometry)
    matvec = lambda v: lin.matvec(v, damping)
    if axis_name is not None:
      matvec = lambda v, mv=matvec: jax.lax.pmean(mv(v), axis_name)
    if per_leaf:
      matvec = quality.block_diagonal(matvec)
    out = quality.cg(matvec, updates, tol=None, max_steps=cg_steps,
                     x0=state.solution if warm_start else None, per_leaf=per_leaf)
    leaves = jax.tree.leaves((updates, out.step))
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))
    step = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), out.step)
    solution = (jax.tree.map(lambda n, o: jnp.where(ok, n, o), out.step, state.solution)
                if warm_start else ())
    return step, ExactStepState(
        count=optax.safe_increment(state.count), solution=solution,
        residual=jnp.where(ok, out.residual, state.residual).astype(jnp.float32),
        skipped_updates=state.skipped_updates + (~ok).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
