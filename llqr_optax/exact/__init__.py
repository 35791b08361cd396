r"""The exact layerwise-LQR reference: dense Riccati steps and direct solves.

For small models, the exact damped step :math:`-(C + \lambda I)^{-1} g` of a
geometry, computed two independent ways:

- :func:`exact_step` (:func:`lqr_problem` then :func:`riccati_step`): the
  layerwise LQR problem over a :class:`Sequential` chain of layers, solved by
  the backward Riccati recursion and a forward rollout;
- :func:`dense_step` / :func:`cg_step`: any ``apply_fn(params)``, the curvature
  materialised and solved directly, or solved matrix-free by CG.

and, to score any optimizer's step against it, :func:`step_quality` (``ρ``,
the fraction of the exact step's model decrease, matrix-free, with
:func:`cg_solve` for the exact step, whole or per-leaf block diagonal).
"""

from llqr_optax.exact.layers import Sequential, as_sequential, from_flax_sequential
from llqr_optax.exact.intermediate import intermediate_curvature
from llqr_optax.exact.problem import LQRProblem, lqr_problem
from llqr_optax.exact.quality import (Solution, StepQuality, block_diagonal, cg,
                                      cg_solve, rho_meter, step_quality)
from llqr_optax.exact.riccati import exact_step, riccati_step
from llqr_optax.exact.solve import cg_step, dense_curvature, dense_step
from llqr_optax.exact.transform import ExactStepState, scale_by_exact_step

__all__ = [
    "ExactStepState",
    "LQRProblem",
    "Sequential",
    "Solution",
    "StepQuality",
    "block_diagonal",
    "cg",
    "cg_solve",
    "as_sequential",
    "cg_step",
    "dense_curvature",
    "dense_step",
    "exact_step",
    "from_flax_sequential",
    "intermediate_curvature",
    "lqr_problem",
    "rho_meter",
    "riccati_step",
    "scale_by_exact_step",
    "step_quality",
]
