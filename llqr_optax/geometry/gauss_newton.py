r"""Gauss-Newton: the Hessian of the loss in the outputs, pulled back.

.. math::

   Q = \nabla^2_z \ell(z, t), \qquad C = J^\top Q J .
"""

from __future__ import annotations

from llqr_optax.geometry import base


class GaussNewton(base.Geometry):
  """``"ggn"``: ``Q = ∇²_z ℓ(z, t)``, the generalised Gauss-Newton matrix."""
  name = "ggn"
  needs_targets = True

  def metric(self, loss, outputs, targets, key):
    del key
    return base.output_hvp(lambda z: loss.fn(z, targets), outputs)
