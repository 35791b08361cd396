r"""Inner solvers: minimise the LQR objective over one block of the structures.

``J`` is an exact quadratic in each block, so conjugate gradients with the
exact line search :math:`\alpha_k = r_k^\top p_k / p_k^\top \nabla^2 J\, p_k`
needs one Hessian product (``n_c`` curvature products) per step. The authors'
choice, momentum SGD with gradient clipping, is kept for comparison.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from llqr_optax._conv_layout import repeat as _loop
from llqr_optax.fitting import objective as obj
from llqr_optax.fitting.problem import Problem

PyTree = Any
#: The inner solvers ``inner_solver=`` takes: conjugate gradients, CG
#: preconditioned by each structure's block Hessian inverse, and the
#: authors' momentum SGD.
SOLVERS = ("cg", "pcg", "sgd")


def _axpy(a, x, y):
  return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)


def clip_leaf_norms(tree: PyTree, max_norm: float) -> PyTree:
  r"""Each leaf scaled down to norm at most ``max_norm`` (leaves apart).

  .. math::

     g_l \leftarrow g_l \cdot \frac{c}{\max(c, \lVert g_l \rVert)} .

  Example:
    >>> import jax.numpy as jnp
    >>> out = clip_leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}, 1.0)
    >>> [round(float(v), 3) for v in out["a"]], float(out["b"][0])
    ([0.6, 0.8], 0.5)
  """
  def clip(g):
    norm = jnp.sqrt(jnp.sum(jnp.square(g)))
    return g * (max_norm / jnp.maximum(norm, max_norm))
  return jax.tree.map(clip, tree)


def cg_block(problem: Problem, states: PyTree, k: int, steps: int,
             preconditioned: bool = False, *, with_products: bool = False) -> Any:
  r"""``steps`` conjugate-gradient steps on block ``k``, from ``states``.

  ``J`` is an exact quadratic in the block, so each step takes the exact line
  search along the conjugate direction ``p``:

  .. math::

     \alpha_k = \frac{r_k^\top p_k}{p_k^\top \nabla^2 J\, p_k}, \qquad
     r_k = -\nabla J(\theta_k),

  at one Hessian product (``n_c`` curvature products) per step. A direction of
  non-positive curvature (possible for an indefinite Newton geometry) stops
  the iteration where it is.

  Args:
    problem: the gradient samples and ``v -> A v``.
    states: per-leaf structure states (the starting point).
    k: the block to fit.
    steps: the number of CG steps.
    preconditioned: precondition by each structure's block Hessian inverse.
    with_products: also return ``(A u_c)`` at the start and at the end, the
      latter tracked along the steps' own products (exact where every leaf's
      ``U`` is linear in block ``k``: a single-block tree), so that no
      further product is needed to evaluate the result.

  Returns:
    ``states`` with block ``k`` fitted; with ``with_products``, the tuple
    ``(states, au_start, au_end)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # two samples, leaf (2,)
    >>> problem = fitting.Problem(g, lambda v: {"w": 2.0 * v["w"]})  # A = 2I
    >>> out = fitting.cg_block(problem, structures.init({"w": jnp.ones(2)}, "diagonal"), 0, 2)
    >>> [round(float(d), 4) for d in out["w"].diag]  # A⁻¹ = I / 2 in two steps
    [0.5, 0.5]
  """
  block = obj.split_block(states, k)
  _, grad, au_start = obj.block_value_grad_products(problem, states, k, block)
  r = jax.tree.map(jnp.negative, grad)
  precond = (obj.block_preconditioner(problem, states, k) if preconditioned
             else (lambda b: b))

  def body(_, carry):
    block, r, p, rz, au = carry
    hp, ap = obj.block_hvp_products(problem, states, k, p)
    php = obj.tree_vdot(p, hp)
    ok = (php > 0) & jnp.isfinite(php) & (rz > 0)
    alpha = jnp.where(ok, rz / jnp.where(ok, php, 1.0), 0.0)
    block = _axpy(alpha, p, block)
    r = _axpy(-alpha, hp, r)
    au = _axpy(alpha, ap, au)  # A u_c moves with the block (U linear in it)
    z = precond(r)
    rz_new = obj.tree_vdot(r, z)
    beta = jnp.where(ok, rz_new / jnp.where(ok, rz, 1.0), 0.0)
    p = _axpy(beta, p, z)
    return block, r, p, rz_new, au

  z = precond(r)
  carry = (block, r, z, obj.tree_vdot(r, z), au_start)
  block, *_, au_end = _loop(steps, body, carry)
  states = obj.merge_block(states, k, block)
  return (states, au_start, au_end) if with_products else states


def sgd_block(problem: Problem, states: PyTree, k: int, steps: int, *,
              learning_rate: float = 1e-3, momentum: float = 0.9,
              clip: float = 5.0) -> PyTree:
  r"""Momentum SGD with per-leaf norm clipping on block ``k`` (the authors' solver).

  .. math::

     m \leftarrow \mu\, m + \operatorname{clip}(\nabla J(\theta)), \qquad
     \theta \leftarrow \theta - \eta\, m ,

  with the gradient of each state array clipped to norm ``clip`` on its own
  (``clip_leaf_norms``), the momentum restarted at every call, and the
  steps taken on ``J`` at the samples' own scale (:func:`~llqr_optax.fitting.refit`
  does not normalise them for this solver): the step sizes are absolute, as
  in the authors' code. There a leaf is a layer (kernel and bias together);
  here it is one parameter array.

  Args:
    problem: the gradient samples and ``v -> A v``.
    states: per-leaf structure states (the starting point).
    k: the block to fit.
    steps: the number of SGD steps.
    learning_rate: ``η``.
    momentum: ``μ``.
    clip: the norm each leaf's gradient is clipped to.

  Returns:
    ``states`` with block ``k`` updated.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # two samples, leaf (2,)
    >>> problem = fitting.Problem(g, lambda v: {"w": 2.0 * v["w"]})  # A = 2I
    >>> out = fitting.sgd_block(problem, structures.init({"w": jnp.ones(2)}, "diagonal"),
    ...                         0, 200, learning_rate=0.1)
    >>> [round(float(d), 3) for d in out["w"].diag]
    [0.5, 0.5]

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  tx = optax.sgd(learning_rate, momentum=momentum)
  block = obj.split_block(states, k)

  def body(_, carry):
    block, opt_state = carry
    _, grad = obj.block_value_and_grad(problem, states, k, block)
    updates, opt_state = tx.update(clip_leaf_norms(grad, clip), opt_state, block)
    return optax.apply_updates(block, updates), opt_state

  block = _loop(steps, body, (block, tx.init(block)))[0]
  return obj.merge_block(states, k, block)


def best_scale(problem: Problem, states: PyTree) -> jax.Array:
  """The scalar ``s`` minimising ``J(s U)``: ``Σ gᵀUg / Σ (Ug)ᵀA(Ug)``."""
  _, u, au = obj.evaluate(problem, states)
  num = obj.tree_vdot(u, problem.grads)
  den = obj.tree_vdot(u, au)
  ok = (den > 0) & jnp.isfinite(den) & jnp.isfinite(num)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0)


def fit(problem: Problem, states: PyTree, *, steps: int,
        solver: str = "pcg") -> PyTree:
  r"""Minimises ``J`` block by block (one pass over the blocks), warm-started.

  For structures with several blocks (Kronecker: ``L`` then ``R``) this is one
  sweep of alternating minimisation,

  .. math::

     \theta_k \leftarrow \text{solver}_{\text{steps}}
       \big(J(\theta_1, \dots, \theta_k, \dots)\big), \quad k = 1, 2, \dots

  Args:
    problem: the gradient samples and ``v -> A v``.
    states: per-leaf structure states (the warm start).
    steps: solver steps per block.
    solver: ``"pcg"`` (preconditioned by each structure's block Hessian
      inverse; the default, as for ``inner_solver`` of
      :func:`~llqr_optax.scale_by_llqr`), ``"cg"`` or ``"sgd"``.

  Returns:
    The fitted states.

  Raises:
    ValueError: on an unknown solver.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # two samples, leaf (2,)
    >>> problem = fitting.Problem(g, lambda v: {"w": 2.0 * v["w"]})  # A = 2I
    >>> out = fitting.fit(problem, structures.init({"w": jnp.ones(2)}, "scalar"), steps=3)
    >>> float(out["w"].scale)  # the best scalar: Σ‖g_c‖² / Σ g_cᵀAg_c
    0.5
  """
  if solver not in SOLVERS:
    raise ValueError(f"inner_solver={solver!r} is unknown; choose one of {list(SOLVERS)}.")
  for k in range(obj.num_blocks(states)):
    if solver == "sgd":
      states = sgd_block(problem, states, k, steps)
    else:
      states = cg_block(problem, states, k, steps, preconditioned=solver == "pcg")
  return states
