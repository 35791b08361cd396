"""The options of :func:`~llqr_optax.scale_by_llqr` and :func:`~llqr_optax.llqr`,
declared once: their names, order and defaults (:class:`Options`), which of
them stay static under ``optax.inject_hyperparams`` (:data:`STATIC`), the
``"auto"`` values resolved, and clear errors for bad ones, before anything
is traced.

The two transforms keep explicit keyword-only signatures (for
``inspect.signature`` and IDEs); ``tests/test_options.py`` checks that they,
and the ``Args:`` section of :func:`~llqr_optax.scale_by_llqr` (the API
reference's table of options), follow :class:`Options` name by name.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax.numpy as jnp

from llqr_optax import _validation as validation
from llqr_optax import fitting
from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax import safety
from llqr_optax import schedule
from llqr_optax import structures


#: ``floor`` by default before another transform (the authors' value).
DEFAULT_FLOOR = 1e-8

#: ``guard`` by default: llqr stands down where the loss, averaged over
#: refits, rises a fifth above its best and past its noise, twice in a row
#: (see :mod:`llqr_optax.safety`).
DEFAULT_GUARD = 1.2

#: ``refit_growth`` by default for llqr with a ``learning_rate`` (llqr is the
#: whole optimizer: ``U``'s scale is the step's, and a ``U`` fitted where the
#: gradient, and so the curvature, was smaller is far too long a step).
DEFAULT_REFIT_GROWTH = 4.0


class Options(NamedTuple):
  """The options of one :func:`~llqr_optax.scale_by_llqr`, in its signature's
  order, with its defaults (documented there).

  :func:`resolve` turns the user's values into the ones the update's stages
  (:mod:`llqr_optax.stages`) read: ``loss`` a
  :class:`~llqr_optax.losses.Loss`, ``geometry`` a
  :class:`~llqr_optax.Geometry`, ``floor`` and ``accept`` without
  ``"auto"``. The options in :data:`STATIC` shape the compiled program and
  are Python values; ``damping`` and ``ema`` may be traced (schedules under
  ``optax.inject_hyperparams``).
  """
  loss: Any
  geometry: Any = "ggn"
  structure: Any = "auto"
  damping: Any = 1.0
  refit_every: int = schedule.DEFAULT_REFIT_EVERY
  num_chunks: int = 4
  inner_steps: int = 3
  inner_solver: str = "pcg"
  ema: Any = 0.9
  adapt_damping: bool = False
  relative_damping: bool = False
  refit_growth: Any = "auto"
  normalize: bool = False
  floor: Any = "auto"
  warmup: bool = True
  cg_steps: int = 0
  guard: Optional[float] = DEFAULT_GUARD
  accept: str = "auto"
  max_dim: int = 1024
  dense_max: int = 4096
  seed: int = 0
  axis_name: Any = None


#: The numeric options that shape the compiled program: under
#: ``optax.inject_hyperparams(llqr)`` their defaults stay static by
#: themselves (:class:`Static`); a value passed for one goes in
#: ``static_args``.
STATIC = ("refit_every", "num_chunks", "inner_steps", "cg_steps", "guard",
          "max_dim", "dense_max", "seed")


class Static:
  """A default of :func:`~llqr_optax.llqr` that ``optax.inject_hyperparams``
  keeps static.

  ``inject_hyperparams`` binds the factory's signature, fills in its
  defaults, and turns every int or float among them into a traced
  hyperparameter unless it is named in ``static_args`` (optax's convention).
  The options in :data:`STATIC` shape the compiled program, so a traced one
  fails; their defaults in :func:`~llqr_optax.llqr`'s signature are wrapped
  in this (not a number to optax; its repr is the value) so that
  ``inject_hyperparams(llqr)(loss=...)`` needs no ``static_args`` for
  options left at their defaults. :func:`unwrap` takes the value back out.
  """
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __repr__(self):
    return repr(self.value)


def unwrap(value):
  """The value of a :class:`Static` default, or ``value`` itself."""
  return value.value if isinstance(value, Static) else value


def from_arguments(arguments: Mapping[str, Any]) -> Options:
  """The :class:`Options` among a call's arguments (e.g. its ``locals()``),
  :class:`Static` defaults unwrapped."""
  return Options(**{name: unwrap(arguments[name]) for name in Options._fields})


def resolve(options: Options) -> Options:
  """``options`` as the stages read them (see :class:`Options`), checked."""
  options = options._replace(
      loss=losses_lib.get_loss(options.loss),
      geometry=geometry_lib.get_geometry(options.geometry))
  options = options._replace(
      floor=resolve_floor(options.floor, options.structure),
      accept="direction" if options.accept == "auto" else options.accept,
      refit_growth=None if is_auto(options.refit_growth) else options.refit_growth)
  check(options)
  return options


def is_auto(value) -> bool:
  """Whether ``value`` is the string ``"auto"`` (a traced value is not)."""
  return isinstance(value, str) and value == "auto"


def resolve_floor(floor: Any, structure: Any) -> Optional[float]:
  """``"auto"``: :data:`DEFAULT_FLOOR`, or ``None`` where no leaf has scales."""
  if not (isinstance(floor, str) and floor == "auto"):
    return floor
  return None if structure in ("kronecker", "dense") else DEFAULT_FLOOR


def check(options: Options) -> None:
  """Clear errors for bad options, before anything is traced."""
  loss, geometry, seed = options.loss, options.geometry, options.seed
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
  if (options.adapt_damping and validation.is_concrete(options.damping)
      and float(options.damping) == 0):
    raise ValueError("damping=0.0 with adapt_damping=True: Levenberg-Marquardt "
                     "rescales the damping and cannot move it from 0; start "
                     "from damping=1e-3, or set adapt_damping=False.")
  if options.floor is not None:
    validation.check_number("floor", options.floor, low=0.0,
                            fix="Try 1e-8, or None.")
    if isinstance(structure := options.structure, str) and structure in ("kronecker", "dense"):
      raise ValueError(
          f"floor={options.floor!r} bounds the scales of 'scalar', 'diagonal' and "
          f"'ekfac' preconditioners; structure={structure!r} has none (its "
          "factors are matrices). Use floor=None, or one of those structures.")
  validation.check_number("ema", options.ema, low=0.0, high=1.0, fix="Try 0.9.")
  if options.guard is not None:
    validation.check_number("guard", options.guard, low=1.0,
                            fix=f"Try {DEFAULT_GUARD}, or None to turn the guard off.")
  if options.refit_growth is not None:
    validation.check_number("refit_growth", options.refit_growth, low=1.0,
                            fix=f"Try {DEFAULT_REFIT_GROWTH}, or None to refit on the "
                                "schedule only.")
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
