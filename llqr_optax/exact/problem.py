"""The dense LQR problem of a layer chain: dynamics and stage costs.

:func:`lqr_problem` linearises a :class:`~llqr_optax.exact.Sequential` at the
current parameters and materialises the problem that
:func:`~llqr_optax.exact.riccati_step` solves (see
:mod:`llqr_optax.exact.riccati` for the maths).
"""

from __future__ import annotations

import functools
from typing import (Any, Callable, List, NamedTuple, Optional,
                    Sequence, Tuple, Union)

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax.exact import layers as layers_lib

Array = jax.Array
PyTree = Any

from llqr_optax.exact.intermediate import Intermediate, check_intermediate


class LQRProblem(NamedTuple):
  r"""The dense LQR problem of one batch; index ``i`` is layer ``i``.

  The dynamics and the cost of the step ``δθ``:

  .. math::

     \delta x_{i+1} = A_i \delta x_i + B_i \delta\theta_i, \qquad
     J = \sum_i \tfrac12 \big[\delta x_i^\top Q_i \delta x_i
       + 2\, \delta\theta_i^\top M_i \delta x_i
       + \delta\theta_i^\top R_i \delta\theta_i\big]
       + a^\top \delta x_N + \tfrac12\, \delta x_N^\top Q_N \delta x_N .

  With ``n_i`` the size of the flattened batch state ``x_i`` (``n_0 = 0``: the
  input is not perturbed) and ``m_i`` the number of parameters of layer ``i``:

  Attributes:
    A: ``A[i]`` of shape ``(n_{i+1}, n_i)``, the state Jacobian.
    B: ``B[i]`` of shape ``(n_{i+1}, m_i)``, the parameter Jacobian (``m_i = 0``
      for a layer without parameters: no control).
    Q: ``Q[i]`` of shape ``(n_i, n_i)``, the stage state cost (Newton's
      Hamiltonian Hessian plus the intermediate metric; else zero).
    M: ``M[i]`` of shape ``(m_i, n_i)``, the stage cross cost.
    R: ``R[i]`` of shape ``(m_i, m_i)``, the stage control cost, damping
      included.
    Q_N: ``(n_N, n_N)``, the geometry's output metric on the flattened outputs.
    a: ``(n_N,)``, the loss gradient in the flattened outputs.
    unravel: ``unravel[i]`` maps a flat vector of length ``m_i`` back to layer
      ``i``'s parameter pytree.
    damping: the ``λ`` added to every ``R[i]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax.exact import Sequential, lqr_problem
    >>> model = Sequential((lambda w, x: x @ w,))
    >>> problem = lqr_problem(model, [jnp.zeros((3, 2))], jnp.ones((4, 3)),
    ...                       jnp.ones((4, 2)), loss="squared_error", damping=1.0)
    >>> problem.B[0].shape, problem.Q_N.shape, problem.a.shape
    ((8, 6), (8, 8), (8,))
  """

  A: List[Array]
  B: List[Array]
  Q: List[Array]
  M: List[Array]
  R: List[Array]
  Q_N: Array
  a: Array
  unravel: Tuple[Callable[[Array], PyTree], ...]
  damping: Union[float, Array]


def sym(m: Array) -> Array:
  """The symmetric part ``½ (M + Mᵀ)`` of a square matrix."""
  return 0.5 * (m + m.T)


def _jacobian(fn, argnums, n_in: int, n_out: int):
  """Forward mode when the inputs are fewer than the outputs, else reverse."""
  if n_in <= n_out:
    return jax.jacfwd(fn, argnums=argnums)
  return jax.jacrev(fn, argnums=argnums)


def _materialise(linear_fn: Callable[[Array], Array], size: int, dtype) -> Array:
  """The dense symmetric matrix of a symmetric linear map on flat vectors."""
  columns = jax.vmap(linear_fn)(jnp.eye(size, dtype=dtype))
  return sym(columns.T)


def lqr_problem(model, params_list: Sequence[PyTree], inputs: Array,
                targets: Any, *, loss: losses_lib.LossLike,
                geometry: geometry_lib.GeometryLike = "ggn",
                damping: Union[float, Array] = 0.0,
                intermediate: Intermediate = None,
                key: Optional[Array] = None) -> LQRProblem:
  r"""Builds the dense LQR problem of a geometry on one batch.

  Dynamics ``A_i = ∂f_i/∂x``, ``B_i = ∂f_i/∂θ_i`` over the flattened batch
  state; terminal cost ``Q_N`` the geometry's output metric, linear term
  ``a = ∇_{x_N} ℓ``. For ``"newton"`` (a geometry with ``second_order``) the
  stage costs are the Hessians of the
  layer Hamiltonians :math:`H_i = p_{i+1}^\top f_i(x_i, \theta_i)`, with
  costates :math:`p_N = a`, :math:`p_i = A_i^\top p_{i+1}`:

  .. math::

     Q_i = \nabla^2_{xx} H_i, \quad M_i = \nabla^2_{\theta x} H_i, \quad
     R_i = \nabla^2_{\theta\theta} H_i;

  for every other geometry they are zero. ``intermediate={i: β_i}`` adds
  ``β_i I`` to ``Q_i`` (``{i: W_i}`` adds the matrix ``W_i``) and damping adds
  ``λ I`` to every ``R_i``.

  Args:
    model: a :class:`~llqr_optax.exact.Sequential` (or a sequence of layer
      functions ``f_i(params_i, x)``).
    params_list: one params pytree per layer, ``None`` where there are none.
    inputs: the input batch ``x_0``.
    targets: the batch's targets.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.geometry.Geometry`.
    damping: ``λ ≥ 0``.
    intermediate: ``None`` or ``{i: β_i or W_i}`` for ``i`` in ``1..N-1``, a
      metric on ``x_i``, the input of layer ``i``.
    key: a PRNG key (``"mc_fisher"`` only).

  Returns:
    An :class:`LQRProblem`. It holds the unravel functions, so return steps,
    not problems, from jitted functions.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax.exact import Sequential
    >>> model = Sequential((lambda w, x: jnp.tanh(x @ w), lambda w, x: x @ w))
    >>> params = [jnp.ones((3, 4)) / 3, jnp.ones((4, 2)) / 4]
    >>> problem = lqr_problem(model, params, jnp.ones((5, 3)),
    ...                       jnp.zeros(5, int), loss="softmax_cross_entropy",
    ...                       damping=1e-3)
    >>> [b.shape for b in problem.B], problem.A[1].shape, problem.Q_N.shape
    ([(20, 12), (10, 8)], (10, 20), (10, 10))

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  model = layers_lib.as_sequential(model)
  model.check_params(params_list)
  geometry_lib.check_damping(damping)
  second_order = geometry_lib.get_geometry(geometry).second_order
  losses_lib.get_loss(loss)  # early errors on unknown names
  params_list = list(params_list)
  shapes = jax.eval_shape(model.activations, params_list, inputs)
  sizes = tuple([0] + [s.size for s in shapes[1:]])
  metric = check_intermediate(intermediate, sizes)
  flat = [ravel_pytree(p) for p in params_list]
  counts = tuple(t.size for t, _ in flat)
  dtype = jnp.dtype(shapes[-1].dtype)

  A, B, outputs = _cached(_dynamics, model)(params_list, inputs)
  Q_N, a = _cached(_terminal, loss, geometry)(outputs, targets, key)
  stage = None
  if second_order:
    stage = _cached(_newton_stage, model)(params_list, inputs, A, a)
  Q, M, R = _stage_costs(sizes[:-1], counts, dtype, stage, metric, damping)
  return LQRProblem(A, B, Q, M, R, Q_N, a, tuple(u for _, u in flat), damping)


# The pieces of lqr_problem are jitted apart, with the model, loss and geometry
# static, so that geometries share the dynamics and models share the terminal
# costs. Unhashable statics (a layer with __eq__ but no __hash__) run unjitted.
_JITTED = {}


def _cached(fn, *static):
  try:
    hash(static)
  except TypeError:
    return functools.partial(fn, *static)
  if fn not in _JITTED:
    _JITTED[fn] = jax.jit(fn, static_argnums=tuple(range(len(static))))
  return functools.partial(_JITTED[fn], *static)


def _flat_layers(model, params_list, inputs):
  """``(xs, thetas, fns)``: the states, flat params, and every ``f_i`` on flat
  vectors (``f_0`` a function of ``θ_0`` alone: ``x_0`` is not a state)."""
  xs = model.activations(params_list, inputs)
  flat = [ravel_pytree(p) for p in params_list]

  def flat_layer(i):
    layer, u, in_shape = model.layers[i], flat[i][1], xs[i].shape
    if i == 0:
      return lambda th: layer(u(th), xs[0]).reshape(-1)
    return lambda x, th: layer(u(th), x.reshape(in_shape)).reshape(-1)
  return xs, [t for t, _ in flat], [flat_layer(i) for i in range(len(model))]


def _dynamics(model, params_list, inputs):
  """``(A, B, outputs)``: the layer Jacobians in the flattened batch state."""
  xs, thetas, fns = _flat_layers(model, params_list, inputs)
  dtype = xs[-1].dtype
  A, B = [], []
  for i, (fn, theta) in enumerate(zip(fns, thetas)):
    n_out = xs[i + 1].size
    if i == 0:
      A.append(jnp.zeros((n_out, 0), dtype))
      B.append(_jacobian(fn, 0, theta.size, n_out)(theta))
    else:
      a_i, b_i = _jacobian(fn, (0, 1), xs[i].size + theta.size, n_out)(
          xs[i].reshape(-1), theta)
      A.append(a_i)
      B.append(b_i)
  return [x.astype(dtype) for x in A], [x.astype(dtype) for x in B], xs[-1]


def _terminal(loss, geometry, outputs, targets, key):
  """``(Q_N, a)``: the output metric as a matrix and the output gradient."""
  loss = losses_lib.get_loss(loss)
  metric = geometry_lib.output_metric(geometry, loss, outputs, targets, key=key)
  q_n = _materialise(lambda e: metric(e.reshape(outputs.shape)).reshape(-1),
                     outputs.size, outputs.dtype)
  return q_n, jax.grad(loss)(outputs, targets).reshape(-1)


def _newton_stage(model, params_list, inputs, A, a):
  """Newton's ``(Q, M, R)``: Hessians of ``H_i = p_{i+1}ᵀ f_i(x_i, θ_i)``,
  with the costates ``p_{i+1} = ∂ℓ/∂x_{i+1}`` swept back from ``p_N = a``."""
  xs, thetas, fns = _flat_layers(model, params_list, inputs)
  num = len(fns)
  Q, M, R = [None] * num, [None] * num, [None] * num
  costate = a
  for i in reversed(range(num)):
    fn, theta = fns[i], thetas[i]
    if i == 0:
      Q[0] = jnp.zeros((0, 0))
      M[0] = jnp.zeros((theta.size, 0))
      R[0] = sym(jax.hessian(lambda th: costate @ fn(th))(theta))
    else:
      hamiltonian = lambda x, th, p=costate, fn=fn: p @ fn(x, th)
      (hxx, _), (htx, htt) = jax.hessian(hamiltonian, argnums=(0, 1))(
          xs[i].reshape(-1), theta)
      Q[i], M[i], R[i] = sym(hxx), htx, sym(htt)
      costate = A[i].T @ costate
  return Q, M, R


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stage_costs(sizes, counts, dtype, stage, metric, damping):
  """``(Q, M, R)``: Newton's terms (or zeros), the intermediate metric on
  ``Q_i`` and the damping on ``R_i``."""
  if stage is None:
    Q = [jnp.zeros((n, n), dtype) for n in sizes]
    M = [jnp.zeros((m, n), dtype) for m, n in zip(counts, sizes)]
    R = [jnp.zeros((m, m), dtype) for m in counts]
  else:
    Q, M, R = ([x.astype(dtype) for x in xs] for xs in stage)
  for i, w in metric.items():
    Q[i] = Q[i] + (w * jnp.eye(sizes[i], dtype=dtype) if jnp.ndim(w) == 0
                   else jnp.asarray(w, dtype))
  R = [r + damping * jnp.eye(m, dtype=dtype) for r, m in zip(R, counts)]
  return Q, M, R
