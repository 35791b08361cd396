"""The fast training loop: two compiled steps, picked on the host.

``update(..., refit=None)`` refits inside a ``lax.cond`` of the compiled step:
the simplest loop, but XLA runs conditionals slowly in two places (GPUs read
the predicate back to the host at every step; XLA:CPU runs convolutions
inside a conditional many times slower). :func:`compile_step` compiles the
user's step twice, with ``refit=True`` and ``refit=False``, and picks one on
the host from llqr's schedule, with a step counter kept on the host: no
conditional and no device-to-host copy per step (except, with llqr's
``refit_growth``, the one bool of its refit request).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from llqr_optax import _validation as validation
from llqr_optax import schedule
from llqr_optax import state as state_lib
class _ScheduledStep:
  """A jitted step with a static ``refit``, dispatched on llqr's schedule."""

  def __init__(self, step_fn: Callable, refit_every: int, warmup: bool,
               state_argnum: int, jit_kwargs, reads_request: bool = False):
    self._jitted = jax.jit(step_fn, static_argnames="refit", **jit_kwargs)
    self._refit_every = refit_every
    self._warmup = warmup
    self._reads_request = reads_request
    self._state_argnum = state_argnum
    self._count: Optional[int] = None
    self._last_state: Any = None
    self.__wrapped__ = step_fn

  @property
  def count(self) -> Optional[int]:
    """llqr's step count as the host tracks it (``None`` before the first call)."""
    return self._count

  def __call__(self, *args, **kwargs):
    state = args[self._state_argnum]
    requested = False
    if self._count is None or state is not self._last_state:
      # A state this loop did not produce (the first call, a restored
      # checkpoint, another loop's): read llqr's count from it, once, and a
      # refit it requests (refit_growth).
      found = state_lib.find_state(state)
      count, requested = jax.device_get((found.count, found.refit_requested))
      self._count, requested = int(count), bool(requested)
    elif self._reads_request:
      # refit_growth: the previous step may have asked for a refit now.
      requested = bool(jax.device_get(state_lib.find_state(state).refit_requested))
    refit = requested or schedule.refit_due(self._count, self._refit_every,
                                            warmup=self._warmup)
    out = self._jitted(*args, refit=refit, **kwargs)
    self._count += 1
    self._last_state = out[self._state_argnum]
    return out

  def lower(self, *args, refit: bool, **kwargs):
    """``jax.jit(...).lower`` of one of the two steps (for inspection)."""
    return self._jitted.lower(*args, refit=refit, **kwargs)


def compile_step(step_fn: Callable, *, refit_every: int = schedule.DEFAULT_REFIT_EVERY,
                 warmup: bool = True, refit_growth: Optional[float] = None,
                 state_argnum: int = 1, **jit_kwargs) -> Callable:
  r"""Compiles a training step twice, refit or not, and runs llqr's schedule.

  ``step_fn(*args, refit)`` is your training step with one extra keyword,
  ``refit``, that it passes to ``tx.update(..., refit=refit)``; it returns a
  tuple with the new optimizer state at the same position as in its
  arguments (``state_argnum``, e.g. ``(params, opt_state, loss)`` for
  ``step_fn(params, opt_state, x, y, refit)``). The returned callable takes the
  same arguments without ``refit``:

  .. math::

     \text{refit}_t = [\,t \in \{0, 1, 2, 4, \dots\} \cup
       \text{refit\_every}\,\mathbb N\,],

  with ``t`` llqr's update count, kept on the host: read from the state once
  (and again whenever the state passed in is not the one the previous call
  returned, e.g. after restoring a checkpoint), then counted, so no step
  waits for the device. Each of the two steps compiles on its first use.

  With llqr's ``refit_growth``, a step whose gradient grew records a request
  in the state (``refit_requested``); pass the same ``refit_growth`` here and
  the next step refits. That costs a device-to-host copy of one bool per
  step, which waits for the previous step to finish (the loop loses the
  overlap of the host's dispatch with the device's work), so without
  ``refit_growth`` nothing is read. A request held by a state the loop did
  not produce (a restored checkpoint) is honoured either way.

  Args:
    step_fn: the training step, taking ``refit`` as a keyword argument.
    refit_every: llqr's ``refit_every`` (pass it when it is not the default).
    warmup: llqr's ``warmup`` (likewise).
    refit_growth: llqr's ``refit_growth``: any value but ``None`` reads the
      state's refit request after every step (its value is not used here).
    state_argnum: the position of the optimizer state in the arguments and in
      the returned tuple.
    **jit_kwargs: passed to :func:`jax.jit` (e.g. ``donate_argnums``).

  Returns:
    The scheduled step; its ``count`` is the host's step count.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llqr_optax
    >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 1))
    >>> tx = optax.chain(llqr_optax.llqr(loss="squared_error"), optax.sgd(0.1))
    >>> def train_step(params, opt_state, x, y, refit):
    ...   apply_fn = lambda p: x @ p["w"]
    ...   grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params, apply_fn=apply_fn,
    ...                                  targets=y, refit=refit)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> step = llqr_optax.compile_step(train_step)
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> opt_state = tx.init(params)
    >>> for _ in range(5):
    ...   params, opt_state = step(params, opt_state, x, y)
    >>> int(llqr_optax.find_state(opt_state).refits), step.count  # at 0, 1, 2, 4
    (4, 5)
  """
  refit_every = validation.static_int("refit_every", refit_every, 1)
  return _ScheduledStep(step_fn, refit_every, bool(warmup), state_argnum, jit_kwargs,
                        reads_request=refit_growth is not None)
