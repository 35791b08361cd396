r"""Newton: the full Hessian of the loss in the parameters.

.. math::

   C = \nabla^2_\theta\, \ell(f(\theta), t)
     = J^\top \nabla^2_z \ell\, J + \sum_i \text{(the layers' own second-order terms)},

a ``jvp`` of ``grad`` (:meth:`~llqr_optax.Geometry.hessian_product`). In the
LQR problem the output Hessian is the terminal cost ``Q_N`` and the layers'
terms are the stage costs: the Hessians of the layer Hamiltonians
(:func:`~llqr_optax.exact.lqr_problem`).
"""

from __future__ import annotations

from llqr_optax.geometry import gauss_newton


class Newton(gauss_newton.GaussNewton):
  """``"newton"``: the full Hessian ``∇²_θ ℓ(f(θ), t)``; its :meth:`metric`
  is the output Hessian, the terminal cost of the LQR problem."""
  name = "newton"
  second_order = True
