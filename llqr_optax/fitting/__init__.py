"""Fitting structured preconditioners by minimising the LQR objective."""

from llqr_optax.fitting.objective import block_value_and_grad, evaluate, lqr_objective
from llqr_optax.fitting.problem import (Problem, build_problem, chunks_for,
                                       curvature_scale,
                                       with_damping)
from llqr_optax.fitting.refit import RefitResult, refit
from llqr_optax.fitting.solvers import SOLVERS, cg_block, fit, sgd_block

__all__ = ["Problem", "RefitResult", "SOLVERS", "block_value_and_grad",
           "build_problem", "chunks_for", "cg_block", "curvature_scale",
           "evaluate", "fit", "lqr_objective", "refit", "sgd_block",
           "with_damping"]
