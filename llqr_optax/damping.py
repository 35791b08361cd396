r"""The damping of llqr's refits: its scale, the trust check and its adaptation.

A refit fits ``U ≈ (C + λI)⁻¹``. This module holds the three rules that
concern ``λ``, apart from the fit itself (as optimistix keeps its damping and
trust-region updates apart from its solvers):

- :func:`refit_damping`: ``λ = damping`` (the default), or ``λ = damping · κ``
  relative to the curvature's scale ``κ ≈ tr(C)/P``;
- :func:`reduction_ratio`: ``ρ̂``, how well the quadratic model predicted the
  loss at the fitted step;
- :func:`levenberg_marquardt`: the next ``damping`` from ``ρ̂``.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

from llqr_optax import fitting

PyTree = Any

#: Bounds of the adapted damping.
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e8


def refit_damping(damping: jax.Array, curvature: Callable[[PyTree], PyTree],
                  like: PyTree, key: jax.Array, *,
                  relative: bool) -> Tuple[jax.Array, jax.Array]:
  r"""The refit's ``λ`` and the curvature scale ``κ`` it was set from.

  .. math::

     \lambda = \begin{cases} d\,\kappa, & \kappa \approx \operatorname{tr}(C)/P
       \text{ (Hutchinson, four products)}, \text{ if relative,} \\
       d, \ \kappa = 0 & \text{otherwise,} \end{cases}

  with ``d = damping``.

  Args:
    damping: ``d``.
    curvature: ``v -> C v``, undamped.
    like: a params-shaped tree.
    key: PRNG key of the probes.
    relative: whether ``λ`` is relative to ``κ``.

  Returns:
    ``(κ, λ)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from llqr_optax import damping
    >>> c = lambda v: {"w": 4.0 * v["w"]}  # tr(C)/P = 4
    >>> kappa, lam = damping.refit_damping(jnp.float32(0.5), c, {"w": jnp.zeros(3)},
    ...                                    jax.random.PRNGKey(0), relative=True)
    >>> float(kappa), float(lam)
    (4.0, 2.0)
  """
  if not relative:
    return jnp.zeros((), jnp.float32), damping
  kappa = fitting.curvature_scale(curvature, like, key)
  return kappa, damping * jnp.maximum(kappa, 1e-12)


def reduction_ratio(loss_before: jax.Array, loss_after: jax.Array,
                    predicted: jax.Array) -> jax.Array:
  r"""``ρ̂``: the loss's actual change over the quadratic model's.

  .. math::

     \hat\rho = \frac{\ell(\theta + \delta) - \ell(\theta)}{m(\delta)},

  ``nan`` where the model predicts no decrease (``m(δ) ≥ 0``).

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import damping
    >>> float(damping.reduction_ratio(jnp.float32(1.0), jnp.float32(0.5), jnp.float32(-1.0)))
    0.5
  """
  ratio = (loss_after - loss_before) / jnp.where(predicted < 0, predicted, -1.0)
  return jnp.where(predicted < 0, ratio, jnp.nan).astype(jnp.float32)


def levenberg_marquardt(damping: jax.Array, ratio: jax.Array) -> jax.Array:
  r"""The next damping from ``ρ̂``: ×2/3 above 0.75, ×3/2 below 0.25.

  A ``ρ̂`` that is not finite keeps the damping; the result stays within
  :data:`MIN_DAMPING` and :data:`MAX_DAMPING`.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import damping
    >>> [float(damping.levenberg_marquardt(jnp.float32(1.0), jnp.float32(r)))
    ...  for r in (0.9, 0.5, 0.1)]
    [0.6666666865348816, 1.0, 1.5]
  """
  adapted = jnp.where(ratio > 0.75, damping * (2 / 3),
                      jnp.where(ratio < 0.25, damping * 1.5, damping))
  return jnp.clip(jnp.where(jnp.isfinite(ratio), adapted, damping),
                  MIN_DAMPING, MAX_DAMPING)
