"""The options of :func:`~llqr_optax.scale_by_llqr`: defaults, ``"auto"``
values resolved, and clear errors for bad ones, before anything is traced."""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp

from llqr_optax import fitting
from llqr_optax import safety
from llqr_optax import stages
from llqr_optax import structures
from llqr_optax import _validation as validation
#: ``floor`` by default before another transform (the authors' value).
DEFAULT_FLOOR = 1e-8

#: ``guard`` by default: llqr stands down where the loss, averaged over
#: refits, rises half as much again as its best (see :mod:`llqr_optax.safety`).
DEFAULT_GUARD = 1.5


def resolve_floor(floor: Any, structure: Any) -> Optional[float]:
  """``"auto"``: :data:`DEFAULT_FLOOR`, or ``None`` where no leaf has scales."""
  if not (isinstance(floor, str) and floor == "auto"):
    return floor
  return None if structure in ("kronecker", "dense") else DEFAULT_FLOOR


def check(options: stages.Options, seed) -> None:
  """Clear errors for bad options, before anything is traced."""
  loss, geometry = options.loss, options.geometry
  if geometry.needs_distribution and loss.distribution is None:
    raise ValueError(
        f"geometry={geometry.name!r} needs the predictive distribution of "
        f"the loss, but loss={loss.name!r} has none (a user callable); use "
        "geometry='ggn', 'newton' or 'empirical_fisher', a built-in loss, or a "
        "llqr_optax.Loss with a distribution.")
  if validation.is_concrete(seed) and not (isinstance(seed, (int, jnp.integer))
                                 or (hasattr(seed, "dtype")
                                     and jnp.issubdtype(seed.dtype, jnp.integer))):
    raise ValueError(f"seed={seed!r} must be an integer.")
  validation.check_number("damping", options.damping, low=0.0,
                fix="Try 1e-3, or 0 (the authors' setting) with floor=1e-8.")
  if options.adapt_damping and validation.is_concrete(options.damping) and float(options.damping) == 0:
    raise ValueError("damping=0.0 with adapt_damping=True: Levenberg-Marquardt "
                     "rescales the damping and cannot move it from 0; start "
                     "from damping=1e-3, or set adapt_damping=False.")
  if options.floor is not None:
    validation.check_number("floor", options.floor, low=0.0, fix="Try 1e-8, or None.")
    if isinstance(structure := options.structure, str) and structure in ("kronecker", "dense"):
      raise ValueError(
          f"floor={options.floor!r} bounds the scales of 'scalar', 'diagonal' and "
          f"'ekfac' preconditioners; structure={structure!r} has none (its "
          "factors are matrices). Use floor=None, or one of those structures.")
  validation.check_number("ema", options.ema, low=0.0, high=1.0, fix="Try 0.9.")
  if options.guard is not None:
    validation.check_number("guard", options.guard, low=1.0,
                  fix=f"Try {DEFAULT_GUARD}, or None to turn the guard off.")
  for name, low in (("refit_every", 1), ("inner_steps", 0), ("num_chunks", 1),
                    ("cg_steps", 0)):
    if validation.is_concrete(getattr(options, name)):
      validation.static_int(name, getattr(options, name), low)
  if options.accept not in safety.ACCEPT:
    raise ValueError(f"accept={options.accept!r} is unknown; choose one of "
                     f"{['auto'] + list(safety.ACCEPT)}.")
  if options.inner_solver not in fitting.SOLVERS:
    raise ValueError(f"inner_solver={options.inner_solver!r} is unknown; choose "
                     f"one of {list(fitting.SOLVERS)}.")
  structure = options.structure
  if (isinstance(structure, str) and structure != "auto"
      and structure not in structures.STRUCTURES):
    raise ValueError(f"structure={structure!r} is unknown; choose one of "
                     f"{['auto'] + list(structures.STRUCTURES)}.")
