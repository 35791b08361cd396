"""llqr's refit schedule: steps 0, 1, 2, 4, 8, … then every ``refit_every``.

``update(..., refit=None)`` follows it inside the compiled step;
:func:`refit_due` evaluates it on the host, for loops that compile two steps
(:func:`~llqr_optax.compile_step`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from llqr_optax import _nnx
from llqr_optax import _validation as validation
from llqr_optax import state as state_lib
#: The refit period of :func:`~llqr_optax.scale_by_llqr` by default.
DEFAULT_REFIT_EVERY = 200


def due(count, refit_every, warmup=True):
  """Steps 0, 1, 2, 4, 8, … below ``refit_every``, then every ``refit_every``
  (without ``warmup``: every ``refit_every`` from step 0)."""
  power_of_two = (count > 0) & ((count & (count - 1)) == 0)
  early = power_of_two & (count < refit_every) if warmup else False
  return (count % refit_every == 0) | early


def refit_due(state_or_step: Any, refit_every: int = DEFAULT_REFIT_EVERY, *,
              warmup: bool = True) -> bool:
  """Whether llqr's schedule refits at this step, as a Python bool.

  The schedule is steps 0, 1, 2, 4, 8, … below ``refit_every``, then every
  ``refit_every`` steps; with ``warmup=False``, every ``refit_every`` steps
  from step 0. ``update`` follows it by itself, inside a
  ``lax.cond``; a loop that compiles two steps instead (``refit=True`` and
  ``refit=False``, see :func:`scale_by_llqr`) picks one with this. That is
  faster where conditionals are slow: GPUs wait for the predicate on the host
  at every step, and XLA:CPU runs convolutions inside a conditional many times
  slower than outside one.

  Pass the optimizer state: the step is then llqr's own ``count``, which is
  saved with the state, so a second loop or a run resumed from a checkpoint
  continues the schedule instead of repeating the warm-up refits; an early
  refit requested by ``refit_growth`` is read from it too. Reading
  the count waits for the previous step to finish (a device-to-host copy of
  one integer); the loop needs a Python bool anyway, to pick the step.

  Args:
    state_or_step: an optimizer state holding an :class:`LLQRState` (anything
      :func:`find_state` accepts, e.g. a chain's state or
      ``nnx.Optimizer.opt_state``), or the number of llqr updates made so far
      as an int.
    refit_every: the refit period given to :func:`scale_by_llqr` (the state
      does not hold it: pass it when it is not the default).
    warmup: the ``warmup`` given to :func:`scale_by_llqr` (likewise).

  Returns:
    ``True`` at a refit step.

  Raises:
    ValueError: on a negative or non-integer step, ``refit_every < 1``, a
      value traced inside ``jit`` (this runs on the host, between steps), or
      a state without an :class:`LLQRState`.

  Example:
    >>> import jax.numpy as jnp, optax, llqr_optax
    >>> [t for t in range(1000) if llqr_optax.refit_due(t, refit_every=200)]
    [0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 400, 600, 800]
    >>> [t for t in range(1000) if llqr_optax.refit_due(t, 200, warmup=False)]
    [0, 200, 400, 600, 800]
    >>> tx = optax.chain(llqr_optax.llqr(loss="squared_error"), optax.adam(1e-3))
    >>> llqr_optax.refit_due(tx.init({"w": jnp.zeros(3)}))  # count 0
    True
  """
  step, requested = state_or_step, False
  if not isinstance(step, (int, float, np.integer, np.floating, jax.Array,
                           np.ndarray)) and not hasattr(step, "ndim"):
    found = state_lib.find_state(step)
    step = _nnx.scalar(found.count)
    requested = _nnx.scalar(found.refit_requested)
  if not validation.is_concrete(step):
    raise ValueError(
        "refit_due runs on the host, between compiled steps, to pick one; it "
        "got a traced value. Call it outside jax.jit, or inside a compiled "
        "step leave refit=None: update then follows the schedule itself.")
  requested = bool(np.asarray(requested))
  step = validation.static_int("step", np.asarray(step).item() if hasattr(step, "ndim")
                     else step, 0)
  refit_every = validation.static_int("refit_every", refit_every, 1)
  return requested or bool(due(np.int64(step), np.int64(refit_every), bool(warmup)))
