"""Argument checks shared by the exact solvers."""

from __future__ import annotations

import jax
import numpy as np

from llqr_optax import geometry as geometry_lib


def check_solve_damping(damping, *, allow_singular: bool, where: str) -> None:
  """Raises ``ValueError`` for a negative damping, or a zero one unless allowed.

  Without damping the Gauss-Newton, Fisher and divergence curvatures are rank
  deficient as soon as the model has more parameters than the batch has output
  values, and the solves of :func:`riccati_step`, :func:`dense_step` and
  :func:`cg_step` are then singular. ``allow_singular=True`` skips the zero
  check when the caller knows the system is invertible. Traced values are not
  checked.
  """
  geometry_lib.check_damping(damping)
  if (isinstance(damping, (np.ndarray, np.generic, jax.Array))
      and not isinstance(damping, jax.core.Tracer) and np.ndim(damping) == 0):
    damping = float(damping)  # a concrete scalar array is checked like a float
  if (isinstance(damping, (int, float)) and damping == 0
      and not allow_singular):
    raise ValueError(
        f"damping={damping!r} is invalid for {where}: it must be > 0, since "
        "the curvature is usually singular without it (a typical value is "
        "1e-3); pass allow_singular=True if you know C (or every S_i) is "
        "invertible at damping=0.")
