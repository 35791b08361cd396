"""The Runner protocol: how the training harness drives one optimizer.

The built-ins (:mod:`benchmarks.training.optimizers`) and the peers
(:mod:`benchmarks.training.peers`) both build :class:`Runner` objects; this
module depends on neither, so neither depends on the other through it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple

import jax

Params = Any
OptState = Any


class Runner(NamedTuple):
  """How the harness drives one optimizer at one learning rate on one task.

  ``init(params, key) -> opt_state``; ``step(params, opt_state, x, y, key) ->
  (params, opt_state, loss)``, already jitted, ``loss`` the batch's mean
  training loss *before* the update (``Task.loss_fn``). ``key`` is a fresh
  PRNG key per step, for optimizers that sample.
  """

  init: Callable[[Params, jax.Array], OptState]
  step: Callable[[Params, OptState, jax.Array, jax.Array, jax.Array],
                 Tuple[Params, OptState, jax.Array]]
