r"""Geometries: matrix-free curvature products on parameter pytrees.

Every geometry is a positive (semi-)definite quadratic form on the parameter
step. Except Newton, each is a metric ``Q`` on the model's outputs pulled back
through the Jacobian ``J`` of ``apply_fn``:

.. math::

   C v = J^\top Q\, J v, \qquad (C + \lambda I) v = J^\top Q J v + \lambda v,

computed as one ``jax.jvp`` (the forward rollout ``δx``), the output-space
product ``Q``, and one ``jax.vjp`` (the costate sweep). ``C`` is never formed.

======================  ========================================================
geometry                output-space metric ``Q``
======================  ========================================================
``"ggn"``               ``∇²_z ℓ(z, t)``, the Gauss-Newton matrix
``"fisher"``            Fisher of the predictive distribution (exact)
``"mc_fisher"``         Fisher from labels sampled from the model
``"empirical_fisher"``  per-event outer products of the observed gradients
``"renyi"``             ``∇²_{z'} D_α(p_z ‖ p_{z'})`` at ``z' = z``
``"reverse_kl"``        ``∇²_{z'} KL(p_{z'} ‖ p_z)`` at ``z' = z``
``"newton"``            none: the full Hessian ``∇²_θ ℓ(f(θ), t)`` (``jvp`` of
                        ``grad``)
======================  ========================================================

Each geometry is a subclass of :class:`Geometry` that carries its own rules
(its metric ``Q``, whether it needs targets, a PRNG key or a predictive
distribution, and Newton's second-order terms), one module per family, and a
line in the registry below: adding one is a class and a line
(:func:`register`).
"""

from llqr_optax.geometry.base import (KINDS, Geometry, GeometryLike, check_damping,
                                      get_geometry, register)
from llqr_optax.geometry.divergences import Divergence, Renyi, ReverseKL
from llqr_optax.geometry.fisher import EmpiricalFisher, Fisher, MonteCarloFisher
from llqr_optax.geometry.gauss_newton import GaussNewton
from llqr_optax.geometry.linearization import (Linearization, curvature_product,
                                               linearize, output_metric)
from llqr_optax.geometry.newton import Newton

# The registry: one line per geometry.
register(GaussNewton)
register(Fisher)
register(MonteCarloFisher)
register(EmpiricalFisher)
register(Newton)
register(Renyi)
register(ReverseKL)

#: The built-in geometry names ``geometry=`` takes (:class:`Geometry` adds
#: options; :func:`register` adds geometries).
GEOMETRIES = tuple(KINDS)

__all__ = ["GEOMETRIES", "Geometry", "Linearization", "check_damping",
           "curvature_product", "get_geometry", "linearize", "output_metric",
           "register"]
