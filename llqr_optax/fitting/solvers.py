"""Inner solvers: minimise the LQR objective over one block of the structures.

``J`` is an exact quadratic in each block, so conjugate gradients with the
exact line search :math:`\\alpha_k = r_k^\\top p_k / p_k^\\top \\nabla^2 J\\, p_k`
needs one Hessian product (``n_c`` curvature products) per step. The authors'
choice, momentum SGD with gradient clipping, is kept for comparison.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import optax

from llqr_optax.fitting import objective as obj
from llqr_optax.fitting.problem import Problem

PyTree = Any
SOLVERS = ("cg", "sgd")


def _axpy(a, x, y):
  return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)


def cg_block(problem: Problem, states: PyTree, k: int, steps: int) -> PyTree:
  """``steps`` conjugate-gradient steps on block ``k``, from ``states``.

  A direction of non-positive curvature (possible for an indefinite Newton
  geometry) stops the iteration where it is.
  """
  block = obj.split_block(states, k)
  _, grad = obj.block_value_and_grad(problem, states, k, block)
  r = jax.tree.map(jnp.negative, grad)

  def body(_, carry):
    block, r, p, rr = carry
    hp = obj.block_hvp(problem, states, k, p)
    php = obj.tree_vdot(p, hp)
    ok = (php > 0) & jnp.isfinite(php) & (rr > 0)
    alpha = jnp.where(ok, obj.tree_vdot(r, p) / jnp.where(ok, php, 1.0), 0.0)
    block = _axpy(alpha, p, block)
    r = _axpy(-alpha, hp, r)
    rr_new = obj.tree_vdot(r, r)
    beta = jnp.where(ok, rr_new / jnp.where(ok, rr, 1.0), 0.0)
    p = _axpy(beta, p, r)
    return block, r, p, rr_new

  carry = (block, r, r, obj.tree_vdot(r, r))
  block = jax.lax.fori_loop(0, steps, body, carry)[0]
  return obj.merge_block(states, k, block)


def sgd_block(problem: Problem, states: PyTree, k: int, steps: int, *,
              learning_rate: float = 1e-3, momentum: float = 0.9,
              clip: float = 5.0) -> PyTree:
  """Momentum SGD with global-norm clipping on block ``k`` (the authors' solver)."""
  tx = optax.chain(optax.clip_by_global_norm(clip),
                   optax.sgd(learning_rate, momentum=momentum))
  block = obj.split_block(states, k)

  def body(_, carry):
    block, opt_state = carry
    _, grad = obj.block_value_and_grad(problem, states, k, block)
    updates, opt_state = tx.update(grad, opt_state, block)
    return optax.apply_updates(block, updates), opt_state

  block = jax.lax.fori_loop(0, steps, body, (block, tx.init(block)))[0]
  return obj.merge_block(states, k, block)


def best_scale(problem: Problem, states: PyTree) -> jax.Array:
  """The scalar ``s`` minimising ``J(s U)``: ``Σ gᵀUg / Σ (Ug)ᵀA(Ug)``."""
  _, u, au = obj.evaluate(problem, states)
  num = obj.tree_vdot(u, problem.grads)
  den = obj.tree_vdot(u, au)
  ok = (den > 0) & jnp.isfinite(den) & jnp.isfinite(num)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0)


def fit(problem: Problem, states: PyTree, *, steps: int,
        solver: str = "cg") -> PyTree:
  """Minimises ``J`` block by block (one pass over the blocks), warm-started."""
  if solver not in SOLVERS:
    raise ValueError(f"inner_solver={solver!r} is unknown; choose one of {list(SOLVERS)}.")
  block_fit = cg_block if solver == "cg" else sgd_block
  for k in range(obj.num_blocks(states)):
    states = block_fit(problem, states, k, steps)
  return states
