r"""Fisher geometries: the predictive distribution's Fisher, exact or estimated.

.. math::

   Q_{\text{Fisher}} = \mathbb{E}_{t \sim p(\cdot \mid z)}
     \big[\nabla_z \ell(z, t) \nabla_z \ell(z, t)^\top\big] \cdot n,

exact (``"fisher"``), from labels sampled from the model (``"mc_fisher"``),
or from the observed labels (``"empirical_fisher"``).
"""

from __future__ import annotations

import jax

from llqr_optax import losses as losses_lib
from llqr_optax.geometry import base


class Fisher(base.Geometry):
  """``"fisher"``: the exact Fisher of the predictive distribution, e.g.
  ``(diag p − ppᵀ) / n`` for the softmax."""
  name = "fisher"
  needs_distribution = True

  def metric(self, loss, outputs, targets, key):
    del targets, key
    losses_lib.fisher_product(loss, outputs, outputs)  # early error if no distribution
    return lambda v: losses_lib.fisher_product(loss, outputs, v)


class EmpiricalFisher(base.Geometry):
  """``"empirical_fisher"``: per-event outer products of the observed
  gradients ``n Σ_e g_e g_eᵀ``."""
  name = "empirical_fisher"
  needs_targets = True

  def metric(self, loss, outputs, targets, key):
    del key
    n = loss.num_events(outputs)
    g = jax.grad(loss.fn)(outputs, targets)
    return base.per_event_outer(loss, g, float(n))


class MonteCarloFisher(base.Geometry):
  """``"mc_fisher"``: the Fisher from ``num_samples`` labels per event drawn
  from the model's predictive distribution."""
  name = "mc_fisher"
  needs_key = True
  needs_distribution = True

  def metric(self, loss, outputs, targets, key):
    del targets
    n = loss.num_events(outputs)
    keys = jax.random.split(key, self.num_samples)
    grads = jax.vmap(lambda k: jax.grad(loss.fn)(
        outputs, losses_lib.sample_targets(loss, k, outputs)))(keys)
    products = [base.per_event_outer(loss, grads[s], n / self.num_samples)
                for s in range(self.num_samples)]
    return lambda v: sum(p(v) for p in products)
