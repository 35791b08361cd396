r"""Divergence geometries: the Hessian of a divergence between predictive
distributions at equality.

.. math::

   Q = \nabla^2_{z'} D(p_z \,\|\, p_{z'})\big|_{z' = z}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llqr_optax import losses as losses_lib
from llqr_optax.geometry import base

Array = jax.Array


class Divergence(base.Geometry):
  """A geometry from a divergence ``D(p ‖ q)`` between the predictive
  distributions at the current outputs (``p``) and perturbed ones (``q``):
  subclasses implement :meth:`divergence`."""
  needs_distribution = True

  def divergence(self, loss: losses_lib.Loss, p_out: Array, q_out: Array) -> Array:
    """``D(p ‖ q)``, averaged over the events of the outputs."""
    raise NotImplementedError

  def metric(self, loss, outputs, targets, key):
    del targets, key
    p_out = jax.lax.stop_gradient(outputs)
    self.divergence(loss, p_out, p_out)  # early error
    return base.output_hvp(lambda q: self.divergence(loss, p_out, q), p_out)


class Renyi(Divergence):
  r"""``"renyi"``: the Rényi divergence of order ``α``,

  .. math::

     D_\alpha(p \,\|\, q) = \frac{1}{\alpha - 1} \log \sum_k p_k^\alpha q_k^{1-\alpha}
     \quad\text{(Gaussian: } \tfrac{\alpha}{2} \|z_p - z_q\|^2 \text{)}.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import Geometry, losses
    >>> d = Geometry("renyi", alpha=2.0).divergence(
    ...     losses.squared_error(), jnp.zeros(2), jnp.ones(2))
    >>> float(d)  # α/2 · ‖z_p − z_q‖² / n
    1.0
  """
  name = "renyi"

  def check_options(self):
    if not self.alpha > 0 or self.alpha == 1:
      raise ValueError(
          f"alpha={self.alpha!r} is not a valid Rényi order: it needs alpha > 0 "
          "and alpha != 1 (alpha = 1 is the KL divergence: use geometry='fisher').")

  def divergence(self, loss, p_out, q_out):
    alpha = self.alpha
    n = loss.num_events(p_out)
    if loss.distribution == "gaussian":
      return 0.5 * alpha * jnp.sum(jnp.square(p_out - q_out)) / n
    logp = losses_lib.log_probs(loss, p_out, what=f"geometry={self.name!r}")
    logq = losses_lib.log_probs(loss, q_out, what=f"geometry={self.name!r}")
    per_event = jax.nn.logsumexp(alpha * logp + (1 - alpha) * logq, axis=-1)
    return jnp.sum(per_event) / ((alpha - 1.0) * n)


class ReverseKL(Divergence):
  r"""``"reverse_kl"``: :math:`\mathrm{KL}(q \,\|\, p)`, ``q`` the perturbed
  distribution (Gaussian: :math:`\tfrac12 \|z_p - z_q\|^2`)."""
  name = "reverse_kl"

  def divergence(self, loss, p_out, q_out):
    n = loss.num_events(p_out)
    if loss.distribution == "gaussian":
      return 0.5 * 1.0 * jnp.sum(jnp.square(p_out - q_out)) / n
    logp = losses_lib.log_probs(loss, p_out, what=f"geometry={self.name!r}")
    logq = losses_lib.log_probs(loss, q_out, what=f"geometry={self.name!r}")
    return jnp.sum(jnp.exp(logq) * (logq - logp)) / n
