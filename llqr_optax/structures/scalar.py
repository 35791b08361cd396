"""Scalar structure: ``U(G) = s · G``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llqr_optax.structures.base import Structure


class ScalarState(NamedTuple):
  """``scale``: the scalar ``s``."""
  scale: jax.Array


class Scalar(Structure):
  """One learned step size per leaf: :math:`U(G) = s\\,G`."""

  name = "scalar"
  State = ScalarState
  blocks = (("scale",),)

  @classmethod
  def init(cls, shape, *, max_dim):
    del shape, max_dim
    return ScalarState(jnp.ones((), jnp.float32))

  @classmethod
  def apply(cls, state, g):
    return state.scale * g
