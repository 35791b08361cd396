"""Dense structure for tiny leaves: ``U vec(G)``."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llqr_optax import sharding
from llqr_optax.structures import base
from llqr_optax.structures.base import Structure


class DenseState(NamedTuple):
  """State of :class:`Dense`.

  Attributes:
    matrix: ``M``, the full ``size × size`` map on the flattened leaf.

  Example:
    >>> Dense.init((2, 3), max_dim=1024).matrix.shape
    (6, 6)
  """
  matrix: jax.Array


class Dense(Structure):
  r"""An unconstrained linear map on the flattened leaf:
  :math:`U(G) = \operatorname{unvec}(M \operatorname{vec}(G))`.

  With enough gradient samples its LQR fit is exactly the damped inverse
  curvature block of the leaf. Memory is ``size²``: for tiny leaves only.

  .. math::

     U(G) = \operatorname{unvec}\big(M \operatorname{vec}(G)\big), \qquad
     M^\star = \arg\min_M J(M).

  Example:
    >>> import jax.numpy as jnp
    >>> state = Dense.init((2,), max_dim=1024)
    >>> Dense.apply(state._replace(matrix=jnp.array([[0.0, 1.0], [1.0, 0.0]])),
    ...             jnp.array([1.0, 2.0]))
    Array([2., 1.], dtype=float32)
  """

  name = "dense"
  State = DenseState
  blocks = (("matrix",),)

  @classmethod
  def resolve(cls, shape, *, where, max_dim, dense_max, named):
    del max_dim, named
    size = math.prod(shape)
    if size > dense_max:
      raise ValueError(
          f"structure='dense' {where} needs a {size}² matrix, above "
          f"dense_max={dense_max}; use 'kronecker' or 'diagonal' for this leaf, "
          "or raise dense_max.")
    return cls.name

  @classmethod
  def identity_like(cls, state):
    return cls.init((state.matrix.shape[0],), max_dim=1)

  @classmethod
  def init(cls, shape, *, max_dim):
    del max_dim
    size = 1
    for s in shape:
      size *= s
    return DenseState(jnp.eye(size, dtype=jnp.float32))

  @classmethod
  def apply(cls, state, g):
    # A split leaf is read whole (it is tiny): M's outer-product gradients
    # then have one unambiguous (replicated) sharding.
    return base.matmul(state.matrix, sharding.replicated(g.reshape(-1))).reshape(g.shape)

  @classmethod
  def state_specs(cls, state, spec):
    """``M`` stays replicated, however the leaf is split: dense is for tiny
    leaves (``"auto"``: at most 16 elements, 256 floats; at most
    ``dense_max``), and its fit contracts ``M`` with the samples' outer
    products over the whole flattened leaf. ``U(g) = M vec(g)`` then reads
    the local rows of ``M``: no gather of ``M``."""
    del spec
    return DenseState(PartitionSpec())

  @classmethod
  def pcg_preconditioner(cls, state, k, samples, eps):
    """``∂²J/∂M² ≈ a · (E[x xᵀ] ⊗ I)``: ``δM ↦ δM E[x xᵀ]⁻¹``."""
    x = sharding.replicated(samples.reshape(samples.shape[0], -1))
    inv = base.regularised_inverse(base.matmul(x.T, x) / x.shape[0], eps)
    return lambda block: (base.matmul(block[0], inv),)
