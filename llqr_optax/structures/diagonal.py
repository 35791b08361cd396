"""Diagonal structure: ``U(G) = D ⊙ G``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llqr_optax._samples import sum_samples
from llqr_optax.structures import base
from llqr_optax.structures.base import Structure


class DiagonalState(NamedTuple):
  """State of :class:`Diagonal`.

  Attributes:
    diag: the elementwise scales ``D``, float32, shaped like the leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> DiagonalState(diag=jnp.ones(3)).diag.shape
    (3,)
  """
  diag: jax.Array


class Diagonal(Structure):
  r"""A learned elementwise scale: :math:`U(G) = D \odot G`.

  .. math::

     U(G)_{ij} = D_{ij}\, G_{ij}, \qquad
     \nabla_D J = \frac{1}{n_c} \sum_c g_c \odot \big(A (D \odot g_c) - g_c\big),

  with ``A = C + λI``: ``J`` is quadratic in ``D``, fitted by conjugate
  gradients. As much state as the leaf; the default (``"auto"``).

  Example:
    >>> import jax.numpy as jnp
    >>> state = Diagonal.init((2,), max_dim=1024)
    >>> Diagonal.apply(state._replace(diag=jnp.array([1.0, 3.0])), jnp.ones(2))
    Array([1., 3.], dtype=float32)
  """

  name = "diagonal"
  State = DiagonalState
  blocks = (("diag",),)
  floors = True

  @classmethod
  def init(cls, shape, *, max_dim):
    del max_dim
    return DiagonalState(jnp.ones(shape, jnp.float32))

  @classmethod
  def apply(cls, state, g):
    return state.diag * g

  @classmethod
  def state_specs(cls, state, spec):
    """``D`` is split like the leaf."""
    return DiagonalState(spec)

  @classmethod
  def pcg_preconditioner(cls, state, k, samples, eps):
    """``∂²J/∂D² ≈ a · diag(E[x²])``: divide by the samples' second moment."""
    inv = base.regularised_reciprocal(
        sum_samples(jnp.square(samples)) / samples.shape[0], eps)
    return lambda block: (block[0] * inv,)
