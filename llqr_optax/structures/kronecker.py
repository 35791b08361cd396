"""Kronecker structure: ``U(G) = L G R``."""

from typing import NamedTuple

import jax

from llqr_optax.structures import base


class KroneckerState(NamedTuple):
  """``left`` (``fan_in²``) and ``right`` (``fan_out²``) factors.

  A side larger than ``max_dim`` holds a vector: a diagonal factor.
  """
  left: jax.Array
  right: jax.Array


class Kronecker(base.Structure):
  """Left and right factors on the leaf seen as a matrix:
  :math:`U(G) = L\\,G\\,R`, i.e. :math:`U = R^\\top \\otimes L` on
  :math:`\\operatorname{vec}(G)`.

  ``U`` is bilinear, so the two factors are fitted in alternation.
  """

  name = "kronecker"
  State = KroneckerState
  blocks = (("left",), ("right",))

  @classmethod
  def init(cls, shape, *, max_dim):
    m, n = base.matrix_shape(shape)
    return KroneckerState(base.side_matrix(m, max_dim), base.side_matrix(n, max_dim))

  @classmethod
  def apply(cls, state, g):
    g2 = g.reshape(base.matrix_shape(g.shape))
    out = base.right_multiply(base.left_multiply(state.left, g2), state.right)
    return out.reshape(g.shape)
