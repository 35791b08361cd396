r"""The exact layerwise-LQR step: dense Riccati recursion over a layer chain.

Linearising a chain ``x_{i+1} = f_i(θ_i, x_i)`` at the current parameters gives
the dynamics

.. math::

   \delta x_{i+1} = A_i\, \delta x_i + B_i\, \delta\theta_i, \qquad
   A_i = \partial f_i / \partial x_i, \quad
   B_i = \partial f_i / \partial \theta_i, \qquad \delta x_0 = 0,

and every geometry's quadratic model of the step is the LQR cost

.. math::

   J(\delta\theta) = \sum_i \tfrac12 \big[\delta x_i^\top Q_i \delta x_i
     + 2\, \delta\theta_i^\top M_i \delta x_i
     + \delta\theta_i^\top R_i \delta\theta_i\big]
     + a^\top \delta x_N + \tfrac12\, \delta x_N^\top Q_N \delta x_N .

Its stationary point, found by the backward Riccati recursion and a forward
rollout, is exactly the damped step :math:`-(C + \lambda I)^{-1} g` of the
matching curvature ``C``. The state ``δx_i`` is the whole flattened batch, so
``K_i`` is ``(batch·width)²``: this is a reference for small models, used to
check the matrix-free solvers and to score approximations.

The input ``x_0`` is never perturbed, so its state has dimension 0: ``A_0``,
``Q_0`` and ``M_0`` are stored with a zero-size state axis, and the input may be
any array (integer token ids included).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax.exact import _checks

Array = jax.Array
PyTree = Any

from llqr_optax.exact.intermediate import Intermediate
from llqr_optax.exact.problem import LQRProblem, sym, lqr_problem


def riccati_step(problem: LQRProblem, *, allow_singular: bool = False) -> List[PyTree]:
  r"""Solves an :class:`LQRProblem` by the Riccati recursion and a rollout.

  From ``K_N = Q_N``, ``λ_N = a``, for ``i = N-1, ..., 0``:

  .. math::

     S_i &= R_i + B_i^\top K_{i+1} B_i, \qquad
     L_i = M_i + B_i^\top K_{i+1} A_i, \\
     K_i &= Q_i + A_i^\top K_{i+1} A_i - L_i^\top S_i^{-1} L_i, \\
     \lambda_i &= A_i^\top \lambda_{i+1}
       - L_i^\top S_i^{-1} B_i^\top \lambda_{i+1},

  then from ``δx_0 = 0``:
  :math:`\delta\theta_i = -S_i^{-1}(L_i \delta x_i + B_i^\top \lambda_{i+1})`,
  :math:`\delta x_{i+1} = A_i \delta x_i + B_i \delta\theta_i`.

  The result is the stationary point of the quadratic model, which is its
  minimiser, ``-(C + λI)^{-1} g``, when ``C + λI`` is positive definite. Every
  ``S_i`` must be invertible: hence ``damping > 0`` is required unless
  ``allow_singular=True``. For Newton, pick a damping that makes ``C + λI``
  positive definite if a descent step is wanted.

  Args:
    problem: from :func:`lqr_problem`.
    allow_singular: skip the ``damping > 0`` check.

  Returns:
    The step ``δθ``, one params pytree per layer (``None`` where the layer has
    no parameters).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from llqr_optax.exact import Sequential, dense_step
    >>> dense = lambda w, x: jnp.tanh(x @ w)
    >>> model = Sequential((dense, dense))
    >>> ks = jax.random.split(jax.random.key(0), 3)
    >>> params = [jax.random.normal(ks[0], (3, 4)), jax.random.normal(ks[1], (4, 2))]
    >>> x, y = jax.random.normal(ks[2], (5, 3)), jnp.zeros((5, 2))
    >>> problem = lqr_problem(model, params, x, y, loss="squared_error",
    ...                       damping=0.1)
    >>> step = riccati_step(problem)
    >>> ref = dense_step(lambda p: model.apply(p, x), params, y,
    ...                  loss="squared_error", damping=0.1)
    >>> all(bool(jnp.allclose(s, r, atol=1e-5)) for s, r in zip(step, ref))
    True

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  _checks.check_solve_damping(problem.damping, allow_singular=allow_singular,
                              where="riccati_step")
  flat = _riccati_recursion(problem.A, problem.B, problem.Q, problem.M,
                            problem.R, problem.Q_N, problem.a)
  return [unravel(dtheta) for unravel, dtheta in zip(problem.unravel, flat)]


@jax.jit
def _riccati_recursion(A, B, Q, M, R, Q_N, a) -> List[Array]:
  """The backward recursion and forward rollout on arrays; flat steps.

  Jitted once per problem shape: every geometry of one model shares it.
  """
  num = len(B)
  K, lam = Q_N, a
  gains = [None] * num
  for i in reversed(range(num)):
    KB = K @ B[i]
    S = sym(R[i] + B[i].T @ KB)
    L = M[i] + KB.T @ A[i]
    rhs = jnp.concatenate([L, (B[i].T @ lam)[:, None]], axis=1)
    sol = jnp.linalg.solve(S, rhs) if S.shape[0] else rhs
    feedback, feedforward = sol[:, :-1], sol[:, -1]
    gains[i] = (feedback, feedforward)
    K = sym(Q[i] + A[i].T @ K @ A[i] - L.T @ feedback)
    lam = A[i].T @ lam - L.T @ feedforward

  dx = jnp.zeros((0,), a.dtype)
  steps = []
  for i in range(num):
    feedback, feedforward = gains[i]
    dtheta = -(feedback @ dx + feedforward)
    dx = A[i] @ dx + B[i] @ dtheta
    steps.append(dtheta)
  return steps


def exact_step(model, params_list: Sequence[PyTree], inputs: Array,
               targets: Any, *, loss: losses_lib.LossLike,
               geometry: geometry_lib.GeometryLike = "ggn",
               damping: Union[float, Array],
               intermediate: Intermediate = None,
               key: Optional[Array] = None,
               allow_singular: bool = False) -> List[PyTree]:
  r"""The exact damped layerwise-LQR step :math:`-(C + \lambda I)^{-1} g`.

  :func:`lqr_problem` then :func:`riccati_step`; jit-compatible with the model
  and the ``intermediate`` keys static. The result is

  .. math::

     \delta\theta^\star = \arg\min_{\delta\theta}
       \; g^\top \delta\theta + \tfrac12\, \delta\theta^\top
       (C + \lambda I)\, \delta\theta = -(C + \lambda I)^{-1} g,

  with ``C`` the geometry's curvature (plus the intermediate metric's), found
  layer by layer without forming ``C``.

  Args:
    model: a :class:`~llqr_optax.exact.Sequential`.
    params_list: one params pytree per layer.
    inputs: the input batch.
    targets: the batch's targets.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.geometry.Geometry`.
    damping: ``λ > 0`` (``0`` only with ``allow_singular=True``).
    intermediate: ``None`` or ``{i: β_i or W_i}``, see :func:`lqr_problem`.
    key: a PRNG key (``"mc_fisher"`` only).
    allow_singular: skip the ``damping > 0`` check.

  Returns:
    The step, one params pytree per layer.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax.exact import Sequential
    >>> model = Sequential((lambda w, x: x @ w,))
    >>> x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    >>> step = exact_step(model, [jnp.zeros((3, 2))], x, y,
    ...                   loss="squared_error", damping=1.0)
    >>> bool(jnp.allclose(step[0], 0.2))  # -(xᵀx/8 + I)⁻¹ g, g = -0.5
    True

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  problem = lqr_problem(model, params_list, inputs, targets, loss=loss,
                        geometry=geometry, damping=damping,
                        intermediate=intermediate, key=key)
  return riccati_step(problem, allow_singular=allow_singular)
