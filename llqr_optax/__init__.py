"""llqr-optax: Layerwise LQR preconditioning for optax.

The geometry (matrix-free curvature products), the exact LQR reference, the
structured preconditioners, their fitting, and the optax transform.
"""

from llqr_optax import losses
from llqr_optax.geometry import Geometry, curvature_product, linearize, output_metric
from llqr_optax.losses import Loss

__version__ = "0.1.0"
