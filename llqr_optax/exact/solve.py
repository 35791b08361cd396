r"""Damped curvature solves for any model: dense (reference) and CG.

For a model ``apply_fn(params) -> outputs`` and a geometry's curvature ``C``,
the exact damped step is

.. math::

   \delta\theta^\star = -(C + \lambda I)^{-1} g, \qquad
   g = \nabla_\theta\, \ell(\text{apply\_fn}(\theta), t).

:func:`dense_step` materialises ``C`` column by column from the matrix-free
:func:`~llqr_optax.geometry.curvature_product` (cost: one product per
parameter, memory: ``P²``) and solves it directly; :func:`cg_step` never forms
``C`` and runs conjugate gradient on the products. Neither needs the model to
be a chain of layers.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax.exact import _checks

Array = jax.Array
PyTree = Any
Matvec = Callable[[PyTree], PyTree]


def _tree_add(x: PyTree, y: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: a + b.astype(a.dtype), x, y)


def _gradient(apply_fn, params, targets, loss: losses_lib.Loss) -> PyTree:
  return jax.grad(lambda p: loss(apply_fn(p), targets))(params)


def _curvature(apply_fn, params, targets, *, loss, geometry, damping, key,
               extra_curvature: Optional[Matvec]) -> Matvec:
  product = geometry_lib.curvature_product(
      apply_fn, params, targets, loss=loss, geometry=geometry,
      damping=damping, key=key)
  if extra_curvature is None:
    return product
  return lambda v: _tree_add(product(v), extra_curvature(v))


def dense_curvature(apply_fn: Callable[[PyTree], Array], params: PyTree,
                    targets: Any = None, *, loss: losses_lib.LossLike,
                    geometry: geometry_lib.GeometryLike = "ggn",
                    key: Optional[Array] = None,
                    extra_curvature: Optional[Matvec] = None) -> Array:
  r"""The undamped curvature ``C`` of a geometry as a dense, symmetric matrix.

  .. math::

     C_{:, j} = C e_j, \qquad C \leftarrow \tfrac12 (C + C^\top),

  over the flattened parameters (``jax.flatten_util.ravel_pytree`` order),
  with one matrix-free product per column, vectorised by ``jax.vmap``.

  Args:
    apply_fn: ``apply_fn(params) -> outputs``, closing over the inputs.
    params: the parameter pytree.
    targets: the batch's targets.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.geometry.Geometry`.
    key: a PRNG key (``"mc_fisher"`` only).
    extra_curvature: an optional extra symmetric product ``v -> C_extra v`` on
      params-shaped pytrees, added to ``C`` (e.g.
      :func:`~llqr_optax.exact.intermediate_curvature`).

  Returns:
    ``C`` of shape ``(P, P)``, ``P`` the number of parameters.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((4, 3))
    >>> c = dense_curvature(lambda w: x @ w, jnp.zeros(3), jnp.zeros(4),
    ...                     loss="squared_error")
    >>> c.tolist()  # xᵀx / 4
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """
  flat, unravel = ravel_pytree(params)
  product = _curvature(apply_fn, params, targets, loss=loss, geometry=geometry,
                       damping=0.0, key=key, extra_curvature=extra_curvature)
  flat_product = lambda v: ravel_pytree(product(unravel(v)))[0]
  columns = jax.vmap(flat_product)(jnp.eye(flat.size, dtype=flat.dtype))
  return 0.5 * (columns + columns.T)


def dense_step(apply_fn: Callable[[PyTree], Array], params: PyTree,
               targets: Any = None, *, loss: losses_lib.LossLike,
               geometry: geometry_lib.GeometryLike = "ggn",
               damping: Union[float, Array],
               key: Optional[Array] = None,
               extra_curvature: Optional[Matvec] = None,
               allow_singular: bool = False) -> PyTree:
  r"""The damped step :math:`-(C + \lambda I)^{-1} g` by a dense solve.

  ``C`` comes from :func:`dense_curvature`; the solve is
  ``jnp.linalg.solve``:

  .. math::

     \delta\theta^\star = -(C + \lambda I)^{-1} g, \qquad
     g = \nabla_\theta\, \ell(\text{apply\_fn}(\theta), t).

  Cost ``O(P)`` curvature products and ``O(P³)`` flops: a reference for
  models of up to a few thousand parameters.

  Args:
    apply_fn: ``apply_fn(params) -> outputs``, closing over the inputs.
    params: the parameter pytree.
    targets: the batch's targets.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.geometry.Geometry`.
    damping: ``λ > 0`` (``0`` only with ``allow_singular=True``: ``C`` is
      usually rank deficient).
    key: a PRNG key (``"mc_fisher"`` only).
    extra_curvature: an optional product added to ``C``.
    allow_singular: skip the ``damping > 0`` check.

  Returns:
    The step, a pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((4, 3))
    >>> step = dense_step(lambda w: x @ w, jnp.zeros((3, 2)), jnp.ones((4, 2)),
    ...                   loss="squared_error", damping=1.0)
    >>> bool(jnp.allclose(step, 0.2))  # -(xᵀx/8 + I)⁻¹ g with g = -0.5
    True
  """
  _checks.check_solve_damping(damping, allow_singular=allow_singular,
                              where="dense_step")
  loss = losses_lib.get_loss(loss)
  g, unravel = ravel_pytree(_gradient(apply_fn, params, targets, loss))
  c = dense_curvature(apply_fn, params, targets, loss=loss, geometry=geometry,
                      key=key, extra_curvature=extra_curvature)
  step = -jnp.linalg.solve(c + damping * jnp.eye(g.size, dtype=c.dtype), g)
  return unravel(step)


def cg_step(apply_fn: Callable[[PyTree], Array], params: PyTree,
            targets: Any = None, *, loss: losses_lib.LossLike,
            geometry: geometry_lib.GeometryLike = "ggn",
            damping: Union[float, Array],
            key: Optional[Array] = None,
            extra_curvature: Optional[Matvec] = None,
            tol: float = 1e-10, maxiter: Optional[int] = None,
            allow_singular: bool = False) -> PyTree:
  r"""The damped step :math:`-(C + \lambda I)^{-1} g` by conjugate gradient.

  Matrix-free: every iteration is one curvature product (a ``jvp`` and a
  ``vjp``, or a Hessian-vector product for Newton), on pytrees, with
  ``jax.scipy.sparse.linalg.cg`` on

  .. math::

     (C + \lambda I)\, \delta\theta = -g .

  CG needs ``C + λI`` symmetric positive
  definite: true for every geometry but Newton when ``λ > 0``; for Newton the
  damping must exceed minus the Hessian's smallest eigenvalue. The iteration
  stops when :math:`\|(C + \lambda I) x + g\| \le \text{tol}\, \|g\|`
  or after ``maxiter`` iterations; JAX reports no convergence flag, so check the
  residual with :func:`~llqr_optax.geometry.curvature_product` if it matters.

  Args:
    apply_fn: ``apply_fn(params) -> outputs``, closing over the inputs.
    params: the parameter pytree.
    targets: the batch's targets.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.geometry.Geometry`.
    damping: ``λ > 0`` (``0`` only with ``allow_singular=True``).
    key: a PRNG key (``"mc_fisher"`` only).
    extra_curvature: an optional product added to ``C``.
    tol: relative residual tolerance.
    maxiter: iteration cap (default: ``10 · P``, JAX's).
    allow_singular: skip the ``damping > 0`` check.

  Returns:
    The step, a pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((4, 3))
    >>> step = cg_step(lambda w: x @ w, jnp.zeros((3, 2)), jnp.ones((4, 2)),
    ...                loss="squared_error", damping=1.0, tol=1e-6)
    >>> bool(jnp.allclose(step, 0.2))
    True
  """
  _checks.check_solve_damping(damping, allow_singular=allow_singular,
                              where="cg_step")
  loss = losses_lib.get_loss(loss)
  g = _gradient(apply_fn, params, targets, loss)
  matvec = _curvature(apply_fn, params, targets, loss=loss, geometry=geometry,
                      damping=damping, key=key, extra_curvature=extra_curvature)
  rhs = jax.tree.map(jnp.negative, g)
  step, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, tol=tol, atol=0.0,
                                       maxiter=maxiter)
  return step
