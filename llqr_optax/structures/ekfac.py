r"""Eigenbasis-Kronecker structure (EKFAC-like): a learned diagonal in a
Kronecker eigenbasis.

The bases are not fitted by the LQR objective: they are the eigenvectors of
exponential moving averages of the gradient's row and column covariances,
:math:`E[G G^\top]` and :math:`E[G^\top G]` (Shampoo's statistics), taken from
the refit's gradient chunks. The scales ``S`` in that basis are fitted.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llqr_optax._samples import sum_samples
from llqr_optax import sharding
from llqr_optax.structures import base


class EigenKroneckerState(NamedTuple):
  """State of :class:`EigenKronecker`.

  A side larger than ``max_dim`` keeps the identity basis, stored as a vector
  of ones, and a vector of second moments.

  Attributes:
    scale: ``S``, the fitted scales in the eigenbasis, ``(fan_in, fan_out)``.
    basis_in: ``Q_A``, eigenvectors of ``cov_in``.
    basis_out: ``Q_G``, eigenvectors of ``cov_out``.
    cov_in: EMA of the normalised row covariance ``E[G Gᵀ]``.
    cov_out: EMA of the normalised column covariance ``E[Gᵀ G]``.

  Example:
    >>> [x.shape for x in EigenKronecker.init((4, 3), max_dim=1024)]
    [(4, 3), (4, 4), (3, 3), (4, 4), (3, 3)]
  """
  scale: jax.Array
  basis_in: jax.Array
  basis_out: jax.Array
  cov_in: jax.Array
  cov_out: jax.Array


def _to_eigenbasis(q_in, q_out, g2):
  """``Q_Aᵀ G Q_G``; a vector basis stands for the identity."""
  g2 = base.matmul(q_in.T, g2) if q_in.ndim == 2 else g2
  return base.matmul(g2, q_out) if q_out.ndim == 2 else g2


def _from_eigenbasis(q_in, q_out, x):
  """``Q_A X Q_Gᵀ``; a vector basis stands for the identity."""
  x = base.matmul(q_in, x) if q_in.ndim == 2 else x
  return base.matmul(x, q_out.T) if q_out.ndim == 2 else x


class EigenKronecker(base.TwoSided):
  r"""A learned diagonal in a Kronecker eigenbasis (EKFAC-like).

  .. math::

     U(G) = Q_A \big[(Q_A^\top G Q_G) \odot S\big] Q_G^\top,

  with ``Q_A``, ``Q_G`` the eigenvectors of moving averages of the gradient's
  row and column covariances (updated at each refit, not fitted) and the
  scales ``S`` fitted: ``J`` is quadratic in ``S``. State
  ``fan_in·fan_out + 2 fan_in² + 2 fan_out²``; an eigendecomposition per side
  at every refit.

  Example:
    >>> import jax.numpy as jnp
    >>> state = EigenKronecker.init((2, 2), max_dim=1024)
    >>> EigenKronecker.apply(state._replace(scale=3 * state.scale), jnp.eye(2))
    Array([[3., 0.],
           [0., 3.]], dtype=float32)
  """

  name = "ekfac"
  State = EigenKroneckerState
  blocks = (("scale",),)
  floors = True
  sides = ("basis_in", "basis_out")

  @classmethod
  def init(cls, shape, *, max_dim):
    m, n = base.matrix_shape(shape)
    return EigenKroneckerState(
        jnp.ones((m, n), jnp.float32),
        base.side_matrix(m, max_dim), base.side_matrix(n, max_dim),
        base.side_matrix(m, max_dim), base.side_matrix(n, max_dim))

  @classmethod
  def apply(cls, state, g):
    g2 = g.reshape(state.scale.shape)
    x = _to_eigenbasis(state.basis_in, state.basis_out, g2) * state.scale
    return _from_eigenbasis(state.basis_in, state.basis_out, x).reshape(g.shape)

  @classmethod
  def state_specs(cls, state, spec):
    """``S`` split like the leaf's matrix; ``Q_A``, ``cov_in`` by rows like
    its rows, ``Q_G``, ``cov_out`` like its columns."""
    rows, cols = sharding.side_axes(spec, len(spec))
    return EigenKroneckerState(
        PartitionSpec(rows, cols), sharding.factor_spec(rows, state.basis_in),
        sharding.factor_spec(cols, state.basis_out), sharding.factor_spec(rows, state.cov_in),
        sharding.factor_spec(cols, state.cov_out))

  @classmethod
  def pcg_preconditioner(cls, state, k, samples, eps):
    """``∂²J/∂S² ≈ a · diag(E[x̂²])``, ``x̂ = Q_Aᵀ X Q_G``: divide by it."""
    x = samples.reshape((samples.shape[0],) + state.scale.shape)
    xh = jax.vmap(lambda g: _to_eigenbasis(state.basis_in, state.basis_out, g))(x)
    inv = base.regularised_reciprocal(sum_samples(jnp.square(xh)) / xh.shape[0], eps)
    return lambda block: (block[0] * inv,)

  @classmethod
  def update_statistics(cls, state, grads, decay):
    g2 = grads.reshape((grads.shape[0],) + state.scale.shape)

    def side(cov, spec):
      if cov.ndim == 1:  # identity basis above max_dim: nothing to track
        return cov, cov
      outer = base.gram(spec, g2, g2)
      # Replicated to split is a local slice: the EMA stays split.
      new = decay * cov + sharding.sharded_like(
          (1 - decay) * outer / jnp.maximum(jnp.trace(outer), 1e-30), cov)
      # XLA has no distributed eigendecomposition: a split covariance is
      # gathered here, once a refit (the one gather of a factor, see docs/devices.md).
      basis = jnp.linalg.eigh(sharding.replicated(new))[1]
      return new, sharding.sharded_like(basis, cov)

    cov_in, basis_in = side(state.cov_in, "cij,ckj->ik")
    cov_out, basis_out = side(state.cov_out, "cji,cjk->ik")
    return state._replace(basis_in=basis_in, basis_out=basis_out,
                          cov_in=cov_in, cov_out=cov_out)
