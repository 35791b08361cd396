"""Kronecker structure: ``U(G) = L G R``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llqr_optax._samples import sum_samples
from llqr_optax import sharding
from llqr_optax.structures import base


class KroneckerState(NamedTuple):
  r"""State of :class:`Kronecker`: the factors of :math:`U = R^\top \otimes L`.

  A side larger than ``max_dim`` holds a vector: a diagonal factor.

  Attributes:
    left: ``L``, ``(fan_in, fan_in)`` (or ``(fan_in,)``).
    right: ``R``, ``(fan_out, fan_out)`` (or ``(fan_out,)``).

  Example:
    >>> [x.shape for x in Kronecker.init((3, 3, 4, 5), max_dim=1024)]
    [(36, 36), (5, 5)]
  """
  left: jax.Array
  right: jax.Array


class Kronecker(base.TwoSided):
  r"""Left and right factors on the leaf seen as a matrix:
  :math:`U(G) = L\,G\,R`, i.e. :math:`U = R^\top \otimes L` on
  :math:`\operatorname{vec}(G)`.

  ``U`` is bilinear, so the two factors are fitted in alternation: ``J`` is
  quadratic in ``L`` for a fixed ``R`` and in ``R`` for a fixed ``L``.
  State ``fan_in² + fan_out²``; two matrix products per application.

  .. math::

     U(G) = L\, G\, R, \qquad
     \operatorname{vec}(L G R) = (R^\top \otimes L) \operatorname{vec}(G).

  Example:
    >>> import jax.numpy as jnp
    >>> state = Kronecker.init((2, 2), max_dim=1024)
    >>> state = state._replace(left=2 * state.left, right=jnp.array([[0.0, 1.0], [1.0, 0.0]]))
    >>> Kronecker.apply(state, jnp.array([[1.0, 2.0], [3.0, 4.0]]))
    Array([[4., 2.],
           [8., 6.]], dtype=float32)
  """

  name = "kronecker"
  State = KroneckerState
  blocks = (("left",), ("right",))
  sides = ("left", "right")

  @classmethod
  def init(cls, shape, *, max_dim):
    m, n = base.matrix_shape(shape)
    return KroneckerState(base.side_matrix(m, max_dim), base.side_matrix(n, max_dim))

  @classmethod
  def apply(cls, state, g):
    g2 = g.reshape(base.matrix_shape(g.shape))
    out = base.right_multiply(base.left_multiply(state.left, g2), state.right)
    return out.reshape(g.shape)

  @classmethod
  def state_specs(cls, state, spec):
    """``L``'s rows split like the leaf's rows, ``R``'s like its columns."""
    rows, cols = sharding.side_axes(spec, len(spec))
    return KroneckerState(sharding.factor_spec(rows, state.left),
                          sharding.factor_spec(cols, state.right))

  @classmethod
  def pcg_preconditioner(cls, state, k, samples, eps):
    """With ``u = L X R``: ``∂²J/∂L² ≈ a · (E[XR (XR)ᵀ] ⊗ I)`` acts as
    ``δL ↦ δL E[XR (XR)ᵀ]``, and ``∂²J/∂R² ≈ a · (I ⊗ E[(LX)ᵀ LX])`` as
    ``δR ↦ E[(LX)ᵀ LX] δR``; both are inverted (diagonal factors: their
    diagonals)."""
    x = samples.reshape((samples.shape[0],) + base.matrix_shape(samples.shape[1:]))
    if k == 0:
      y = jax.vmap(lambda g: base.right_multiply(g, state.right))(x)  # X R
      if state.left.ndim == 1:
        inv = base.regularised_reciprocal(
            sum_samples(jnp.sum(y * y, axis=2)) / y.shape[0], eps)
        return lambda block: (block[0] * inv,)
      inv = base.regularised_inverse(
          base.gram("cij,ckj->ik", y, y)
          / y.shape[0], eps)
      return lambda block: (base.matmul(block[0], inv),)
    y = jax.vmap(lambda g: base.left_multiply(state.left, g))(x)  # L X
    if state.right.ndim == 1:
      inv = base.regularised_reciprocal(
          sum_samples(jnp.sum(y * y, axis=1)) / y.shape[0], eps)
      return lambda block: (block[0] * inv,)
    inv = base.regularised_inverse(
        base.gram("cji,cjk->ik", y, y)
        / y.shape[0], eps)
    return lambda block: (base.matmul(inv, block[0]),)
