"""Scalar structure: ``U(G) = s · G``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llqr_optax.structures.base import Structure


class ScalarState(NamedTuple):
  """State of :class:`Scalar`.

  Attributes:
    scale: the scalar ``s`` (a float32 array of shape ``()``).

  Example:
    >>> ScalarState(scale=2.0).scale
    2.0
  """
  scale: jax.Array


class Scalar(Structure):
  r"""One learned step size per leaf: :math:`U(G) = s\,G`.

  .. math::

     J(s) = -s \sum_c \|g_c\|^2 / n_c + \tfrac{s^2}{2} \sum_c g_c^\top A g_c / n_c
     \;\Rightarrow\; s^\star = \frac{\sum_c \|g_c\|^2}{\sum_c g_c^\top A g_c},

  with ``A = C + λI`` (on one leaf alone; with other leaves the fit is joint).
  One float of state; it rescales the gradient, never changes its direction.

  Example:
    >>> import jax.numpy as jnp
    >>> state = Scalar.init((2, 3), max_dim=1024)
    >>> Scalar.apply(state._replace(scale=jnp.float32(0.5)), jnp.ones((2, 3))).sum()
    Array(3., dtype=float32)
  """

  name = "scalar"
  State = ScalarState
  blocks = (("scale",),)
  floors = True

  @classmethod
  def init(cls, shape, *, max_dim):
    del shape, max_dim
    return ScalarState(jnp.ones((), jnp.float32))

  @classmethod
  def apply(cls, state, g):
    return state.scale * g

  @classmethod
  def pcg_preconditioner(cls, state, k, samples, eps):
    """``∂²J/∂s² ≈ a · E‖x‖²``: divide by it."""
    h = jnp.mean(jnp.sum(jnp.square(samples.reshape(samples.shape[0], -1)), axis=1))
    inv = jnp.where(h > 0, 1.0 / jnp.where(h > 0, h, 1.0), 1.0)
    return lambda block: (block[0] * inv,)
