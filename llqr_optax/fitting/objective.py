r"""The LQR objective of a structured preconditioner, and its exact gradient.

For gradient samples :math:`g_c` and the damped curvature :math:`A = C + \lambda I`,

.. math::

   J(U) = \frac{1}{n_c} \sum_c \Big[ -g_c^\top U x_c
          + \tfrac12 (U x_c)^\top A\, (U x_c) \Big],

the LQR cost of the open-loop policy :math:`\delta\theta = -U x` averaged
over gradients, with :math:`x_c = g_c` (``U`` preconditions the gradient) or
another optimizer's direction for :math:`g_c`.
:math:`\partial J / \partial u_c = (A u_c - g_c)/n_c` at
:math:`u_c = U x_c`: one curvature product per sample (a ``jvp`` forward, a
``vjp`` costate sweep), then the pullback through ``U`` by autodiff. Over
unconstrained ``U`` the minimiser maps every :math:`x_c` to :math:`A^{-1} g_c`
(for :math:`x_c = g_c`: :math:`U = A^{-1}` on the span of the samples).

The fitted parameters are one *block* of every leaf's state at a time (see
:class:`~llqr_optax.structures.Structure`), in which ``U`` is linear, so ``J``
is an exact quadratic in the block.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp

from llqr_optax import structures
from llqr_optax._samples import map_products, map_samples
from llqr_optax.fitting.problem import Problem

PyTree = Any


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """``Σ_leaves ⟨a, b⟩`` in float32."""
  # Not jnp.vdot: a contraction of two arrays sharded over an explicit mesh
  # axis has no unambiguous output sharding; an elementwise product and a sum
  # does.
  return sum((jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             jnp.zeros((), jnp.float32))


def num_blocks(states: PyTree) -> int:
  """The largest number of alternating blocks over the leaves."""
  counts = jax.tree.leaves(structures.map_states(lambda cls, s: len(cls.blocks), states))
  return max(counts, default=1)


def split_block(states: PyTree, k: int) -> PyTree:
  """The fields of block ``k`` of every leaf (an empty tuple where absent)."""
  def take(cls, s):
    return tuple(getattr(s, f) for f in cls.blocks[k]) if k < len(cls.blocks) else ()
  return structures.map_states(take, states)


def merge_block(states: PyTree, k: int, block: PyTree) -> PyTree:
  """``states`` with block ``k`` replaced by ``block``."""
  def put(s, b):
    cls = structures.structure_of(s)
    return s._replace(**dict(zip(cls.blocks[k], b))) if k < len(cls.blocks) else s
  return jax.tree.map(put, states, block, is_leaf=structures.is_state)


def block_preconditioner(problem: Problem, states: PyTree, k: int,
                         eps: float = 1e-3):
  """An approximate inverse Hessian of ``J`` in block ``k``, leaf by leaf.

  Each structure's :meth:`~llqr_optax.structures.Structure.pcg_preconditioner`
  inverts the Hessian of its block for ``A ≈ I``, which depends on the
  samples' second moments only (regularised by ``eps`` relative to its mean
  diagonal): the inner CG then sees a problem whose conditioning comes from
  ``A``'s deviation from a multiple of ``I``, not from the spread of the
  gradient samples.

  Returns:
    A function on block trees (as from :func:`split_block`).
  """
  treedef = jax.tree.structure(states, is_leaf=structures.is_state)
  leaf_states = treedef.flatten_up_to(states)
  leaf_samples = treedef.flatten_up_to(problem.samples)
  fns = [structures.structure_of(s).pcg_preconditioner(s, k, x, eps)
         if k < len(structures.structure_of(s).blocks) else (lambda b: b)
         for s, x in zip(leaf_states, leaf_samples)]

  def apply(block):
    parts = treedef.flatten_up_to(block)
    out = [jax.tree.map(lambda o, i: o.astype(i.dtype), f(b), b)
           for f, b in zip(fns, parts)]
    return jax.tree.unflatten(treedef, out)
  return apply


def precondition_samples(states: PyTree, samples: PyTree) -> PyTree:
  """``u_c = U x_c`` for every sample (leading chunk axis)."""
  return map_samples(lambda x: structures.apply(states, x), samples)


def _num_samples(problem: Problem) -> int:
  return jax.tree.leaves(problem.grads)[0].shape[0]


def evaluate(problem: Problem, states: PyTree) -> Tuple[jax.Array, PyTree, PyTree]:
  r"""``J(U)`` with the samples ``u_c = U x_c`` and their products ``A u_c``.

  .. math::

     J(U) = \frac{1}{n_c} \sum_c u_c^\top \big(\tfrac12 A u_c - g_c\big),
     \qquad u_c = U x_c .

  Args:
    problem: the gradient samples and ``v -> A v``.
    states: per-leaf structure states.

  Returns:
    ``(J, u, Au)``, ``u`` and ``Au`` with a leading sample axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # two samples, leaf (2,)
    >>> problem = fitting.Problem(g, lambda v: {"w": 2.0 * v["w"]})  # A = 2I
    >>> value, u, au = fitting.evaluate(problem, structures.init({"w": jnp.ones(2)}, "diagonal"))
    >>> float(value), au["w"].tolist()  # (½·2·1 - 1 + ½·2·4 - 4) / 2
    (0.0, [[2.0, 0.0], [0.0, 4.0]])
  """
  u = precondition_samples(states, problem.samples)
  au = map_products(problem.matvec, u)
  half = jax.tree.map(lambda a, g: 0.5 * a - g, au, problem.grads)
  return tree_vdot(u, half) / _num_samples(problem), u, au


def lqr_objective(problem: Problem, states: PyTree) -> jax.Array:
  r"""``J(U)`` (the module's objective) for the preconditioners in ``states``.

  Over unconstrained ``U`` its minimiser maps every ``x_c`` to ``A⁻¹g_c``,
  with value ``−½ Σ_c g_cᵀA⁻¹g_c / n_c`` (for ``x_c = g_c``: ``U = A⁻¹`` on
  the span of the samples).

  Args:
    problem: the gradient samples and ``v -> A v``.
    states: per-leaf structure states.

  Returns:
    ``J``, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import structures
    >>> g = {"w": jnp.ones((2, 3))}  # two samples of a 3-vector leaf
    >>> problem = Problem(g, lambda v: v)  # A = I
    >>> float(lqr_objective(problem, structures.init({"w": jnp.ones(3)}, "scalar")))
    -1.5
  """
  return evaluate(problem, states)[0]


def block_value_and_grad(problem: Problem, states: PyTree, k: int,
                         block: PyTree) -> Tuple[jax.Array, PyTree]:
  r"""``J`` and ``∂J/∂block``: products ``A u_c`` pulled back through ``U``.

  .. math::

     \frac{\partial J}{\partial u_c} = \frac{1}{n_c}\,(A u_c - g_c),
     \qquad
     \frac{\partial J}{\partial \theta_k}
       = \sum_c \Big(\frac{\partial u_c}{\partial \theta_k}\Big)^{\!\top}
         \frac{\partial J}{\partial u_c},

  one curvature product per sample, then a ``vjp`` through ``U``.

  Args:
    problem: the gradient samples and ``v -> A v``.
    states: per-leaf structure states (the other blocks are held fixed).
    k: the block index (see :attr:`Structure.blocks`).
    block: the values of block ``k`` at which to evaluate, as from
      ``split_block(states, k)``.

  Returns:
    ``(J, grad)`` with ``grad`` shaped like ``block``.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # two samples, leaf (2,)
    >>> problem = fitting.Problem(g, lambda v: {"w": 2.0 * v["w"]})  # A = 2I
    >>> from llqr_optax.fitting import objective
    >>> states = structures.init({"w": jnp.ones(2)}, "scalar")
    >>> value, grad = fitting.block_value_and_grad(
    ...     problem, states, 0, objective.split_block(states, 0))
    >>> float(value), float(grad["w"][0])  # J(s) = 2.5 s² - 2.5 s at s = 1
    (0.0, 2.5)
  """
  value, grad, _ = block_value_grad_products(problem, states, k, block)
  return value, grad


def block_value_grad_products(problem: Problem, states: PyTree, k: int,
                              block: PyTree) -> Tuple[jax.Array, PyTree, PyTree]:
  """:func:`block_value_and_grad` and the products ``A u_c`` it made."""
  n = _num_samples(problem)
  u, pullback = jax.vjp(
      lambda b: precondition_samples(merge_block(states, k, b), problem.samples), block)
  au = map_products(problem.matvec, u)
  value = tree_vdot(u, jax.tree.map(lambda a, g: 0.5 * a - g, au, problem.grads)) / n
  grad = pullback(jax.tree.map(lambda a, g: (a - g) / n, au, problem.grads))[0]
  return value, grad, au


def block_hvp(problem: Problem, states: PyTree, k: int, direction: PyTree) -> PyTree:
  """``∇²J · direction`` in block ``k`` (``J`` is quadratic there)."""
  return block_hvp_products(problem, states, k, direction)[0]


def block_hvp_products(problem: Problem, states: PyTree, k: int,
                       direction: PyTree) -> Tuple[PyTree, PyTree]:
  """:func:`block_hvp` and the products ``A (∂u_c/∂θ_k · direction)`` it made:
  where ``U`` is linear in block ``k``, what ``A u_c`` moves by per unit step
  along ``direction``."""
  n = _num_samples(problem)
  fn = lambda b: precondition_samples(merge_block(states, k, b), problem.samples)
  # ``U g`` is affine, not linear, in block ``k`` when some leaves have no block
  # ``k`` (a diagonal bias next to a Kronecker kernel): only the linear part,
  # the ``jvp``, enters the Hessian product.
  block = split_block(states, k)
  _, u = jax.jvp(fn, (block,), (direction,))
  _, pullback = jax.vjp(fn, block)
  au = map_products(problem.matvec, u)
  return pullback(jax.tree.map(lambda a: a / n, au))[0], au
