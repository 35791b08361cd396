"""The quality study's measure ρ and its baselines, in float64 NumPy.

ρ(U) scores a preconditioner against the exact damped step on a fresh batch
(see ``quality/run.py``); the baselines are the preconditioners it is compared
with: 1/diag(A), block-diagonal inverses, K-FAC's Kronecker factors, the
exact solve of the fit batches' curvature, and Adam's diagonal.
"""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import scipy.linalg

from benchmarks.quality.kit import ALL_STRUCTURES
from benchmarks.quality.models import Layout, Net

# Method keys, in table order, with a readable label and what they are.
BASELINES = {
    "exact": "exact step, fresh batch (library cg_step)",
    "identity": "identity (SGD)",
    "adam_diag": "Adam diagonal 1/(sqrt(v)+eps)",
    "diag_inverse_fit": "1/diag(A), fit batches",
    "diag_inverse_oracle": "1/diag(A), fresh batch",
    "blockdiag_leaf_fit": "block-diag inverse per leaf, fit batches",
    "blockdiag_layer_fit": "block-diag inverse per layer, fit batches",
    "kfac_ideal_leaf": "ideal K-FAC: block-diag inverse per leaf, fresh batch",
    "kfac_ideal_layer": "ideal K-FAC: block-diag inverse per layer, fresh batch",
    "kfac": "K-FAC Kronecker factors, fit batches",
    "stale_exact": "exact inverse of the fit batches' mean A",
}


def llqr_key(structure: str) -> str:
  """The method key of llqr's ``structure``."""
  return f"llqr_{structure}"


def methods() -> Dict[str, str]:
  """Every method key, baselines then llqr's structures, with its label."""
  return dict(BASELINES, **{llqr_key(s): f"llqr {s}, fitted on the fit batches"
                            for s in ALL_STRUCTURES})


def method_order(rows) -> List[str]:
  """The methods present in ``rows``, in table order."""
  present = {r["method"] for r in rows}
  return [m for m in methods() if m in present]


def smallest_eigenvalue(c: np.ndarray) -> float:
  """The smallest eigenvalue of a symmetric matrix (Lanczos, dense fallback)."""
  import scipy.sparse.linalg
  try:
    return float(scipy.sparse.linalg.eigsh(c, k=1, which="SA", tol=1e-8,
                                           return_eigenvectors=False)[0])
  except scipy.sparse.linalg.ArpackNoConvergence:
    return float(scipy.linalg.eigvalsh(c, subset_by_index=[0, 0])[0])


def rho(u: np.ndarray, g: np.ndarray, a: np.ndarray, g_ainv_g: float) -> float:
  """``(gᵀu)² / (uᵀAu · gᵀA⁻¹g)`` for ``u = U g``."""
  uau = float(u @ a @ u)
  gu = float(g @ u)
  if not (uau > 0 and g_ainv_g > 0 and np.isfinite(uau) and np.isfinite(gu)):
    return float("nan")
  return gu * gu / (uau * g_ainv_g)


def block_solve(a: np.ndarray, g: np.ndarray, blocks) -> np.ndarray:
  """``blockdiag(A)⁻¹ g``; ``g`` may hold several right-hand sides as columns."""
  u = np.zeros_like(g)
  for idx in blocks:
    u[idx] = scipy.linalg.solve(a[np.ix_(idx, idx)], g[idx], assume_a="sym")
  return u


class Factor:
  """One factorisation of a symmetric matrix for many solves: Cholesky, or LU
  when it is not positive definite."""

  def __init__(self, a: np.ndarray):
    try:
      self.chol, self.lu = scipy.linalg.cho_factor(a), None
    except np.linalg.LinAlgError:
      self.chol, self.lu = None, scipy.linalg.lu_factor(a)

  @property
  def positive_definite(self) -> bool:
    return self.chol is not None

  def solve(self, b: np.ndarray) -> np.ndarray:
    if self.chol is not None:
      return scipy.linalg.cho_solve(self.chol, b)
    return scipy.linalg.lu_solve(self.lu, b)


def kfac_apply(net: Net, layout: Layout, factors, damping: float,
               g: np.ndarray) -> np.ndarray:
  """K-FAC: per layer ``(F_A + π√λ I)⁻¹ [G_w; g_b] (F_G + √λ/π I)⁻¹``."""
  u = np.zeros_like(g)
  root = math.sqrt(damping)
  for (name, _, _), (fa, fg) in zip(net.layers, factors):
    w_idx = layout.leaf_index[name]["w"]
    b_idx = layout.leaf_index[name]["b"]
    w_mat = w_idx.reshape(-1, w_idx.shape[-1])
    gm = np.concatenate([g[w_mat], g[b_idx][None, :]], axis=0)
    pi = math.sqrt((np.trace(fa) / fa.shape[0]) / max(np.trace(fg) / fg.shape[0], 1e-30))
    left = fa + pi * root * np.eye(fa.shape[0])
    right = fg + root / pi * np.eye(fg.shape[0])
    um = np.linalg.solve(left, gm)
    um = np.linalg.solve(right.T, um.T).T  # um @ right⁻¹ (right symmetric)
    u[w_mat] = um[:-1]
    u[b_idx] = um[-1]
  return u


def adam_diag(state, layout: Layout, eps: float = 1e-8) -> np.ndarray:
  """``1/(√v̂ + ε)`` from optax.adam's state (bias-corrected second moment)."""
  adam = state[0]
  count = int(adam.count)
  v_hat = layout.flat(adam.nu) / (1 - 0.999 ** count)
  return 1.0 / (np.sqrt(v_hat) + eps)

