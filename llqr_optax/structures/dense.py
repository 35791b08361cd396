"""Dense structure for tiny leaves: ``U vec(G)``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llqr_optax.structures.base import Structure


class DenseState(NamedTuple):
  """``matrix``: the full ``size × size`` map on the flattened leaf."""
  matrix: jax.Array


class Dense(Structure):
  """An unconstrained linear map on the flattened leaf:
  :math:`U(G) = \\operatorname{unvec}(M \\operatorname{vec}(G))`.

  With enough gradient samples its LQR fit is exactly the damped inverse
  curvature block of the leaf. Memory is ``size²``: for tiny leaves only.
  """

  name = "dense"
  State = DenseState
  blocks = (("matrix",),)

  @classmethod
  def init(cls, shape, *, max_dim):
    del max_dim
    size = 1
    for s in shape:
      size *= s
    return DenseState(jnp.eye(size, dtype=jnp.float32))

  @classmethod
  def apply(cls, state, g):
    return (state.matrix @ g.reshape(-1)).reshape(g.shape)
