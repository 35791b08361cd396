"""llqr-optax: Layerwise LQR preconditioning for optax.

The package is laid out as the method is:

- :mod:`llqr_optax.losses`, :mod:`llqr_optax.geometry`: the geometry, as
  matrix-free curvature products on parameter pytrees;
- :mod:`llqr_optax.exact`: the exact layerwise LQR reference (Riccati), with
  dense and conjugate-gradient solves;
- :mod:`llqr_optax.structures`: structured inverse preconditioners per leaf;
- :mod:`llqr_optax.fitting`: the LQR objective and its inner solvers;
- :mod:`llqr_optax.transform`: the optax transform, whose update runs the
  stages of :mod:`llqr_optax.stages` (with the damping rules of
  :mod:`llqr_optax.damping`), keeps an :mod:`llqr_optax.state` and refits on
  :mod:`llqr_optax.schedule`;
  :mod:`llqr_optax.compose`: ``U`` around another optimizer's update;
  :mod:`llqr_optax.loop`: the fast loop (two compiled steps, no conditional);
  :mod:`llqr_optax.sharding`: the state's shardings from the params' (FSDP);
  :mod:`llqr_optax.presets`: named settings (``PAPER``, the authors').
"""

from llqr_optax import exact, fitting, losses, structures
from llqr_optax.exact import (cg_step, dense_step, exact_step, rho_meter,
                              scale_by_exact_step, step_quality)
from llqr_optax.geometry import (GEOMETRIES, Geometry, curvature_product,
                                 linearize, output_metric)
from llqr_optax.compose import PreconditionBaseState, precondition_base
from llqr_optax.loop import compile_step
from llqr_optax.losses import Loss
from llqr_optax.presets import PAPER
from llqr_optax.structures import STRUCTURES
from llqr_optax.schedule import refit_due
from llqr_optax.sharding import state_shardings
from llqr_optax.state import (DIAGNOSTICS, LLQRState, diagnostics, find_state,
                              precondition)
from llqr_optax.transform import llqr, scale_by_llqr

__version__ = "0.1.0"

__all__ = [
    "DIAGNOSTICS", "GEOMETRIES", "Geometry", "LLQRState", "Loss", "PAPER",
    "PreconditionBaseState", "STRUCTURES", "cg_step", "compile_step",
    "curvature_product",
    "dense_step", "diagnostics", "exact", "exact_step", "find_state", "fitting",
    "linearize", "llqr", "losses", "output_metric", "precondition",
    "precondition_base", "refit_due", "rho_meter", "scale_by_exact_step", "scale_by_llqr",
    "state_shardings", "step_quality", "structures"]
