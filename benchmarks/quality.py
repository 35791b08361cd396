"""Approximation quality ρ of llqr's structured preconditioners against the exact step.

On small MNIST-1D models where the damped curvature ``A = C + λI`` can be
materialised, every preconditioner ``U`` is scored on a *fresh* batch (``g`` its
gradient, ``A`` its curvature) by the fraction of the exact damped step's
quadratic-model decrease that the best-scaled step ``−α* U g`` achieves:

.. math::

   \\rho(U) = \\frac{m(-\\alpha^* U g)}{m(-A^{-1} g)}
            = \\frac{(g^\\top U g)^2}{(Ug)^\\top A\\, (Ug) \\cdot g^\\top A^{-1} g}
            \\in [0, 1],

with ``m(δ) = gᵀδ + ½ δᵀAδ``. 1 is the exact step; ``ρ`` is invariant to a
global scale of ``U``.

Protocol, per model: a short Adam training from a seeded initialisation gives
the parameters ``θ`` (so the curvature is not the one at init); llqr's
structures are then fitted at ``θ`` by ``--refits`` successive refits on
earlier, distinct batches (``fitting.build_problem`` + ``fitting.refit``,
warm-started, EMA, the transform's defaults: 8 chunks, 10 CG steps, ema 0.9),
and scored on ``--fresh`` other batches (mean over them). Baselines, side by
side: identity (SGD); Adam's diagonal ``1/(√v̂ + ε)``; ``1/diag(A)``; the
exact block-diagonal inverse of ``A`` per leaf and per layer (weight and bias
together), both from the fresh batch itself ("oracle": the ideal K-FAC) and
from the fit batches; real K-FAC Kronecker factors (layer inputs with a 1
appended, pre-activation gradients for labels sampled from the model, KFC's
factors for the convolutions, factored Tikhonov damping) from the fit batches;
the exact solve of the fit batches' mean curvature applied to the fresh
gradient ("stale exact"); and the library's own dense solve on the fresh batch
(``llqr_optax.exact.cg_step``, ρ = 1 up to float32 and CG tolerance: the check
that this script's dense ``A`` and ``g`` are the library's).

A second study scores ρ against refit compute: CG with 1, 3, 10, 30 inner
steps and the authors' momentum SGD with 10, 50, 200, x-axis the number of
curvature products the refits used.

Writes ``quality.json`` and ``quality_rho.png`` / ``quality_compute.png`` to
``--out`` (default ``benchmarks/out``). ``--quick`` runs a tiny configuration
in seconds (used by the tests).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `python benchmarks/quality.py` from anywhere
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import scipy.linalg  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import llqr_optax  # noqa: E402
from llqr_optax import exact, fitting, structures  # noqa: E402
from llqr_optax.geometry import Geometry, curvature_product  # noqa: E402
from benchmarks import datasets  # noqa: E402
from benchmarks import provenance as provenance_lib  # noqa: E402

LOSS = "softmax_cross_entropy"
ALL_GEOMETRIES = ("ggn", "fisher", "newton", "renyi", "reverse_kl",
                  "empirical_fisher", "mc_fisher")
ALL_STRUCTURES = ("scalar", "diagonal", "kronecker", "ekfac", "dense")
RENYI_ALPHA = 0.5
# The library's CG solve that gives the "exact" row (float32).
CG_TOL, CG_MAXITER = 1e-6, 3000

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
  return f"llqr_{structure}"


# --------------------------------------------------------------------------
# Models: plain JAX chains of affine layers (dense, or conv by im2col), so the
# forward pass exposes each layer's inputs and pre-activations for K-FAC.


class Net:
  """A chain of affine layers with relu between them, ending in logits.

  ``layers`` entries: ``(name, kind, cfg)`` with kind ``"dense"`` (cfg:
  ``(d_in, d_out)``) or ``"conv"`` (cfg: ``(k, c_in, c_out, stride, pad)``,
  1-D, kernel stored ``(k, c_in, c_out)``). Conv layers see the input as
  ``(n, length, channels)``; a dense layer after a conv flattens it.
  """

  def __init__(self, name: str, layers: Sequence[tuple], in_length: int = 40):
    self.name = name
    self.layers = tuple(layers)
    self.in_length = in_length

  def __hash__(self):
    return hash((self.name, self.layers))

  def __eq__(self, other):
    return isinstance(other, Net) and (self.name, self.layers) == (other.name, other.layers)

  def describe(self) -> str:
    parts = []
    for name, kind, cfg in self.layers:
      if kind == "dense":
        parts.append(f"{name}: dense {cfg[0]}->{cfg[1]}")
      else:
        k, ci, co, s, p = cfg
        parts.append(f"{name}: conv1d k{k} {ci}->{co} stride {s} pad {p}")
    return "; ".join(parts) + " (relu between layers)"

  def init(self, key) -> Dict[str, Dict[str, jax.Array]]:
    params = {}
    for (name, kind, cfg), k in zip(self.layers,
                                    jax.random.split(key, len(self.layers))):
      if kind == "dense":
        d_in, d_out = cfg
        shape, fan_in = (d_in, d_out), d_in
      else:
        kk, ci, co, _, _ = cfg
        shape, fan_in, d_out = (kk, ci, co), kk * ci, co
      params[name] = {"w": jnp.sqrt(2.0 / fan_in) * jax.random.normal(k, shape),
                      "b": jnp.zeros((shape[-1],))}
    return params

  @staticmethod
  def _patches(h, k, stride, pad):
    """``(n, L, c) -> (n, T, k·c)``: im2col, rows ordered like ``w.reshape(k·c, ·)``."""
    h = jnp.pad(h, ((0, 0), (pad, pad), (0, 0)))
    length = h.shape[1]
    t = (length - k) // stride + 1
    idx = stride * np.arange(t)[:, None] + np.arange(k)[None, :]
    p = h[:, idx, :]  # (n, T, k, c)
    return p.reshape(p.shape[0], t, k * h.shape[2])

  def forward(self, params, x, perturb=None):
    """Logits and, per layer, the inputs ``a`` ``(n, T, d_in)`` (dense: T = 1).

    ``perturb``: optional per-layer arrays added to the pre-activations
    ``(n, T, d_out)`` (zeros: their gradient is the pre-activation gradient).
    """
    h = x
    inputs = []
    num = len(self.layers)
    for i, (name, kind, cfg) in enumerate(self.layers):
      w, b = params[name]["w"], params[name]["b"]
      if kind == "dense":
        a = h.reshape(h.shape[0], 1, -1)
      else:
        k, _, _, stride, pad = cfg
        if h.ndim == 2:
          h = h[:, :, None]
        a = self._patches(h, k, stride, pad)
      s = a @ w.reshape(-1, w.shape[-1]) + b
      if perturb is not None:
        s = s + perturb[i]
      inputs.append(a)
      h = s if kind != "dense" else s[:, 0, :]
      if i < num - 1:
        h = jax.nn.relu(h)
    return h, inputs

  def apply(self, params, x):
    return self.forward(params, x)[0]

  def preact_shapes(self, n):
    shapes, length = [], self.in_length
    for _, kind, cfg in self.layers:
      if kind == "dense":
        shapes.append((n, 1, cfg[1]))
      else:
        k, _, co, s, p = cfg
        length = (length + 2 * p - k) // s + 1
        shapes.append((n, length, co))
    return shapes


def make_models(quick: bool) -> List[Net]:
  if quick:
    return [Net("mlp_40-16-10", [("l1", "dense", (40, 16)),
                                 ("l2", "dense", (16, 10))])]
  return [
      Net("mlp_40-32-32-10", [("l1", "dense", (40, 32)),
                              ("l2", "dense", (32, 32)),
                              ("l3", "dense", (32, 10))]),
      Net("conv1d_8-12", [("c1", "conv", (5, 1, 8, 2, 2)),
                          ("c2", "conv", (5, 8, 12, 2, 2)),
                          ("out", "dense", (120, 10))]),
  ]


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --------------------------------------------------------------------------
# Flat-vector bookkeeping.


class Layout:
  """Flat (``ravel_pytree``) indices of every leaf and every layer."""

  def __init__(self, params):
    flat, self.unravel = ravel_pytree(params)
    self.size = int(flat.size)
    idx = self.unravel(jnp.arange(self.size, dtype=jnp.float32))
    self.leaf_index = jax.tree.map(lambda a: np.asarray(a).astype(np.int64), idx)
    self.leaves = [np.ravel(a) for a in jax.tree.leaves(self.leaf_index)]
    self.layers = {name: np.concatenate([np.ravel(a) for a in jax.tree.leaves(sub)])
                   for name, sub in self.leaf_index.items()}

  def flat(self, tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)

  def tree(self, vec):
    return self.unravel(jnp.asarray(vec, jnp.float32))


# --------------------------------------------------------------------------
# Jitted pieces, one set per model.


def geometry_of(name: str) -> Geometry:
  return Geometry(name, alpha=RENYI_ALPHA) if name == "renyi" else Geometry(name)


class Kit:
  """Compiled functions of one model."""

  def __init__(self, net: Net, layout: "Layout", num_chunks: int, ema: float,
               col_batch: int):
    self.net = net
    self.col_batch = col_batch
    unravel_f32 = lambda flat: jax.tree.map(lambda x: x.astype(jnp.float32),
                                            layout.unravel(flat))

    @jax.jit
    def grad(params, x, y):
      return jax.grad(lambda p: xent(net.apply(p, x), y))(params)

    @functools.partial(jax.jit, static_argnames=("geometry", "col_batch"))
    def dense_c(params, x, y, key, *, geometry, col_batch):
      """The undamped curvature ``C`` (float32), column batches of products.

      ``col_batch`` columns at a time: for ``empirical_fisher`` and
      ``mc_fisher`` it must keep ``col_batch · outputs.size ≤ 32768``, the size
      above which XLA:CPU (jaxlib 0.10.2) miscompiles their output-space
      product ``g · Σ_k (g ⊙ v)`` when ``g`` is broadcast over the batch of
      columns (see ``safe_col_batch``).
      """
      apply_fn = lambda p: net.apply(p, x)
      product = curvature_product(apply_fn, params, y, loss=LOSS,
                                  geometry=geometry_of(geometry), damping=0.0,
                                  key=key)
      flat, unravel = ravel_pytree(params)
      column = lambda e: ravel_pytree(product(unravel(e)))[0]
      cols = jax.lax.map(column, jnp.eye(flat.size, dtype=flat.dtype),
                         batch_size=col_batch)
      return 0.5 * (cols + cols.T)

    @functools.partial(jax.jit, static_argnames=("geometry",))
    def library_exact(params, x, y, key, damping, *, geometry):
      """``A⁻¹ g`` by the library's matrix-free CG solve (one product at a
      time: a different path from ``dense_c``'s batched columns)."""
      step = exact.cg_step(lambda p: net.apply(p, x), params, y, loss=LOSS,
                           geometry=geometry_of(geometry), damping=damping,
                           key=key, tol=CG_TOL, maxiter=CG_MAXITER)
      return jax.tree.map(jnp.negative, step)

    @jax.jit
    def chunk_grads(params, x, y):
      """The refit's gradient samples ``g_c`` (independent of the geometry)."""
      problem, _, _ = fitting.build_problem(
          lambda p: net.apply(p, x), params, y, loss=LOSS, geometry="ggn",
          damping=0.0, num_chunks=num_chunks)
      return problem.grads

    @functools.partial(jax.jit, static_argnames=("solver",))
    def fit_dense(states, grads, cs, damping, steps, *, solver):
      """``len(cs)`` warm-started refits, as the transform does, on problems
      whose curvature product is the dense ``C_r`` of each fit batch (the same
      linear map as ``build_problem``'s jvp/vjp product, see ``fit_library``),
      so one compilation serves every geometry."""
      def body(states, inp):
        r, g, c = inp
        def matvec(v):
          flat = ravel_pytree(v)[0]
          return unravel_f32(c @ flat + damping * flat)
        result = fitting.refit(fitting.Problem(g, matvec), states, steps=steps,
                               solver=solver, ema=ema, first=r == 0)
        return result.states, result.objective
      return jax.lax.scan(body, states, (jnp.arange(cs.shape[0]), grads, cs))

    @functools.partial(jax.jit, static_argnames=("geometry", "solver"))
    def fit_library(states, params, xs, ys, keys, damping, steps, *, geometry,
                    solver):
      """The same refits through ``fitting.build_problem`` (jvp/vjp products)."""
      def body(states, inp):
        r, x, y, key = inp
        problem, _, _ = fitting.build_problem(
            lambda p: net.apply(p, x), params, y, loss=LOSS,
            geometry=geometry_of(geometry), damping=damping,
            num_chunks=num_chunks, key=key)
        result = fitting.refit(problem, states, steps=steps, solver=solver,
                               ema=ema, first=r == 0)
        return result.states, result.objective
      return jax.lax.scan(body, states, (jnp.arange(xs.shape[0]), xs, ys, keys))

    @jax.jit
    def kfac_stats(params, x, key):
      """Per layer: ``E[ā āᵀ]`` (ā = input with a 1 appended, averaged over
      examples and positions) and ``E_i[Σ_t δ δᵀ]`` (pre-activation gradients
      of the per-example loss for labels sampled from the model)."""
      logits, inputs = net.forward(params, x)
      y_s = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
      zeros = [jnp.zeros(s) for s in net.preact_shapes(x.shape[0])]
      total = lambda e: optax.softmax_cross_entropy_with_integer_labels(
          net.forward(params, x, e)[0], y_s).sum()
      deltas = jax.grad(total)(zeros)
      out = []
      for a, d in zip(inputs, deltas):
        n, t = a.shape[0], a.shape[1]
        a1 = jnp.concatenate([a, jnp.ones((n, t, 1), a.dtype)], axis=-1)
        fa = jnp.einsum("nti,ntj->ij", a1, a1) / (n * t)
        fg = jnp.einsum("nti,ntj->ij", d, d) / n
        out.append((fa, fg))
      return out

    self.grad, self.dense_c, self.library_exact = grad, dense_c, library_exact
    self.chunk_grads, self.fit_dense, self.fit_library = chunk_grads, fit_dense, fit_library
    self.kfac_stats = kfac_stats


def safe_col_batch(geometry: str, outputs_size: int, col_batch: int) -> int:
  """Columns per batch in ``dense_c``; see its docstring for the XLA bug."""
  if geometry in ("empirical_fisher", "mc_fisher"):
    return max(1, min(col_batch, 32768 // outputs_size))
  return col_batch


def products_per_fit(structure: str, solver: str, steps: int, refits: int,
                     num_chunks: int, params) -> int:
  """Curvature products (one per gradient sample) that ``refits`` refits use.

  Per refit (see ``llqr_optax.fitting.refit``): the first one's best-scale
  rescale (``n_c``), per block ``n_c`` for the gradient plus ``n_c`` per CG
  step (``n_c`` per SGD step), and the final evaluation (``n_c``), which a
  single-block structure fitted by CG takes from the fit's own products.
  """
  states = structures.init(params, structure)
  blocks = fitting.objective.num_blocks(states)
  per_block = (1 + steps) if solver in ("cg", "pcg") else steps
  tracked = blocks == 1 and solver in ("cg", "pcg")
  per_refit = blocks * per_block + (0 if tracked else 1)
  return num_chunks * (refits * per_refit + 1)


# --------------------------------------------------------------------------
# ρ and the baselines, in float64 NumPy.


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


# --------------------------------------------------------------------------


def adam_train(net: Net, params, x, y, idx, lr):
  tx = optax.adam(lr)
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(lambda p: xent(net.apply(p, xb), yb))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for b in idx:
    params, state, loss = step(params, state, x[b], y[b])
    losses.append(float(loss))
  return params, state, losses


def llqr_train(net: Net, params, x, y, idx, lr, config: str):
  """``chain(llqr(**config), adam(lr))`` on the batches ``idx``, in one compiled
  step per refit decision (``refit_due`` on llqr's own count)."""
  kwargs = eval(f"dict({config})", {"llqr_optax": llqr_optax})  # noqa: S307
  tx = optax.chain(llqr_optax.llqr(loss=LOSS, **kwargs), optax.adam(lr))
  state = tx.init(params)
  every = kwargs.get("refit_every", 200)

  @functools.partial(jax.jit, static_argnames="refit")
  def step(params, state, xb, yb, refit):
    apply_fn = lambda p: net.apply(p, xb)
    loss, grads = jax.value_and_grad(lambda p: xent(apply_fn(p), yb))(params)
    updates, state = tx.update(grads, state, params, apply_fn=apply_fn,
                               targets=yb, refit=refit)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for b in idx:
    params, state, loss = step(params, state, x[b], y[b],
                               refit=llqr_optax.refit_due(state, every))
    losses.append(float(loss))
  return params, state, losses


def trained_rows(net: Net, kit: "Kit", layout: "Layout", params0, x_j, y_j,
                 adam_idx, fit_idx, fresh_idx, args, key) -> List[Dict[str, Any]]:
  """ρ of the preconditioner that training holds, on fresh batches.

  For each ``--trained`` configuration: train ``chain(llqr, adam)`` from the
  same initialisation on the same batches as the Adam run, then score, at
  the parameters it reached, the preconditioner in its state
  (``llqr_optax.precondition``) against the identity, the chain's own Adam
  diagonal, K-FAC's Kronecker factors and the exact block-diagonal inverse
  per layer (fit batches, and the fresh batch's own: the ideal K-FAC), under
  the damped GGN of every ``--dampings`` value.
  """
  out = []
  for config in args.trained:
    params, state, losses = llqr_train(net, params0, x_j, y_j, adam_idx,
                                       args.adam_lr, config)
    inner = llqr_optax.find_state(state)
    adam_state = state[1]
    count = int(adam_state[0].count)
    u_adam = 1.0 / (np.sqrt(layout.flat(adam_state[0].nu) / (1 - 0.999 ** count)) + 1e-8)
    xs_fit, ys_fit = x_j[fit_idx], y_j[fit_idx]
    fresh = [(x_j[i], y_j[i]) for i in fresh_idx]
    gs = [layout.flat(kit.grad(params, xb, yb)) for xb, yb in fresh]
    u_llqr = [layout.flat(llqr_optax.precondition(state, layout.tree(g))) for g in gs]
    c_fresh = [np.asarray(kit.dense_c(params, xb, yb, key, geometry="ggn",
                                      col_batch=kit.col_batch), np.float64)
               for xb, yb in fresh]
    c_fit = np.mean([np.asarray(kit.dense_c(params, xs_fit[r], ys_fit[r], key,
                                            geometry="ggn", col_batch=kit.col_batch),
                                np.float64) for r in range(args.refits)], 0)
    stats = [kit.kfac_stats(params, xs_fit[r], jax.random.fold_in(key, r))
             for r in range(args.refits)]
    factors = [(np.mean([np.asarray(st[l][0], np.float64) for st in stats], 0),
                np.mean([np.asarray(st[l][1], np.float64) for st in stats], 0))
               for l in range(len(net.layers))]
    layers = list(layout.layers.values())
    for damping in args.dampings:
      eye = np.eye(layout.size)
      a_fit = c_fit + damping * eye
      methods = {
          "llqr_trained": lambda f, g, a: u_llqr[f],
          "identity": lambda f, g, a: g,
          "adam_diag": lambda f, g, a: u_adam * g,
          "kfac": lambda f, g, a: kfac_apply(net, layout, factors, damping, g),
          "blockdiag_layer_fit": lambda f, g, a: block_solve(a_fit, g, layers),
          "kfac_ideal_layer": lambda f, g, a: block_solve(a, g, layers),
      }
      for name, u_of in methods.items():
        vals = []
        for f, g in enumerate(gs):
          a = c_fresh[f] + damping * eye
          ainv_g = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), g)
          vals.append(rho(u_of(f, g, a), g, a, float(g @ ainv_g)))
        out.append(dict(model=net.name, config=config or "(defaults)",
                        damping=damping, method=name, rho=float(np.mean(vals)),
                        rho_per_batch=vals, refits=int(inner.refits),
                        train_loss_last10=float(np.mean(losses[-10:]))))
    cells = "  ".join(f"{r['method']} {r['rho']:.3f}" for r in out
                      if r["model"] == net.name and r["config"] == (config or "(defaults)"))
    print(f"[{net.name}] trained {config or '(defaults)'}: {cells}", flush=True)
  return out


def adam_diag(state, layout: Layout, eps: float = 1e-8) -> np.ndarray:
  """``1/(√v̂ + ε)`` from optax.adam's state (bias-corrected second moment)."""
  adam = state[0]
  count = int(adam.count)
  v_hat = layout.flat(adam.nu) / (1 - 0.999 ** count)
  return 1.0 / (np.sqrt(v_hat) + eps)


def provenance() -> Dict[str, Any]:
  """Commit, this script's state in it and hash, the CPU."""
  return provenance_lib.of_script(__file__)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny MLP, ggn only, 2 structures, 2 refits: seconds")
  p.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "out",
                 help="folder for quality.json and the plots")
  p.add_argument("--seed", type=int, default=0,
                 help="seeds init, batch choice and sampled labels")
  p.add_argument("--adam-steps", type=int, default=None,
                 help="Adam steps before measuring (default 200; quick 30)")
  p.add_argument("--adam-lr", type=float, default=1e-2)
  p.add_argument("--batch", type=int, default=128,
                 help="examples per fit and fresh batch (default 128)")
  p.add_argument("--refits", type=int, default=None,
                 help="refits on distinct earlier batches (default 5; quick 2)")
  p.add_argument("--fresh", type=int, default=None,
                 help="fresh batches ρ is averaged over (default 2; quick 1)")
  p.add_argument("--dampings", type=float, nargs="+", default=None,
                 help="λ values (default 1.0 0.1; quick 1.0)")
  p.add_argument("--geometries", nargs="+", default=None, choices=ALL_GEOMETRIES)
  p.add_argument("--structures", nargs="+", default=None, choices=ALL_STRUCTURES)
  p.add_argument("--models", nargs="+", default=None,
                 help="model names to run (default all)")
  p.add_argument("--num-chunks", type=int, default=8)
  p.add_argument("--inner-steps", type=int, default=10)
  p.add_argument("--inner-solver", default="cg", choices=["cg", "pcg", "sgd"],
                 help="the inner solver of the table's llqr fits")
  p.add_argument("--trained", nargs="*", default=None,
                 help="llqr configurations (keyword arguments as Python source; "
                      "'' for the defaults) whose preconditioner is scored after "
                      "training chain(llqr, adam) for --adam-steps steps "
                      "(default: the defaults, and structure='kronecker')")
  p.add_argument("--ema", type=float, default=0.9)
  p.add_argument("--cg-steps", type=int, nargs="*", default=None,
                 help="compute study: CG inner steps (default 1 3 10 30)")
  p.add_argument("--sgd-steps", type=int, nargs="*", default=None,
                 help="compute study: momentum-SGD inner steps (default 10 50 200)")
  p.add_argument("--compute-structures", nargs="+", default=None,
                 choices=ALL_STRUCTURES,
                 help="compute study structures (default diagonal kronecker ekfac)")
  p.add_argument("--compute-geometry", default="ggn", choices=ALL_GEOMETRIES)
  p.add_argument("--check-geometries", nargs="*", default=None,
                 choices=ALL_GEOMETRIES,
                 help="geometries where the fit is redone through "
                      "fitting.build_problem to check the dense-product fit "
                      "(default ggn mc_fisher newton; quick ggn)")
  args = p.parse_args(argv)
  q = args.quick
  pick = lambda v, full, quick: v if v is not None else (quick if q else full)
  args.adam_steps = pick(args.adam_steps, 200, 30)
  args.refits = pick(args.refits, 5, 2)
  args.fresh = pick(args.fresh, 2, 1)
  args.dampings = pick(args.dampings, [1.0, 0.1], [1.0])
  args.geometries = pick(args.geometries, list(ALL_GEOMETRIES), ["ggn"])
  args.structures = pick(args.structures, list(ALL_STRUCTURES), ["diagonal", "kronecker"])
  args.cg_steps = pick(args.cg_steps, [1, 3, 10, 30], [1, 3])
  args.sgd_steps = pick(args.sgd_steps, [10, 50, 200], [])
  args.check_geometries = pick(args.check_geometries, ["ggn", "mc_fisher", "newton"],
                               ["ggn"])
  args.trained = pick(args.trained, ["", "structure='kronecker'"], [""])
  args.compute_structures = pick(args.compute_structures,
                                 ["diagonal", "kronecker", "ekfac"], ["diagonal"])
  for name in ("refits", "fresh", "batch", "num_chunks"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.batch < args.num_chunks:
    p.error("--batch must be at least --num-chunks")
  return args


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  t0 = time.perf_counter()
  load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"quality: jax {jax.__version__} on {jax.default_backend()}, "
        f"{os.cpu_count()} cpus; {'quick' if args.quick else 'full'} run", flush=True)
  data = datasets.mnist1d(1000 if args.quick else 5000)
  x_all, y_all = np.asarray(data["x_train"]), np.asarray(data["y_train"])
  n_train = x_all.shape[0]
  models = make_models(args.quick)
  if args.models:
    known = [m.name for m in models]
    bad = [m for m in args.models if m not in known]
    if bad:
      raise ValueError(f"--models {bad} unknown; choose from {known}")
    models = [m for m in models if m.name in args.models]

  rows: List[Dict[str, Any]] = []
  compute_rows: List[Dict[str, Any]] = []
  model_info: List[Dict[str, Any]] = []
  curvature_info: List[Dict[str, Any]] = []
  checks: List[Dict[str, Any]] = []
  trained: List[Dict[str, Any]] = []
  timings: Dict[str, float] = {}

  for mi, net in enumerate(models):
    tm = time.perf_counter()
    key = jax.random.fold_in(jax.random.PRNGKey(args.seed), mi)
    k_init, k_fit, k_fresh, k_kfac = jax.random.split(key, 4)
    rng = np.random.default_rng([args.seed, mi])
    # Disjoint examples for the fit batches and the fresh batches; Adam trains
    # on shuffled epochs of the whole training set (the fit and fresh batches
    # included: they are "earlier" and "fresh" for llqr, not held out).
    perm = rng.permutation(n_train)
    need = (args.refits + args.fresh) * args.batch
    if need > n_train:
      raise ValueError(f"{need} examples needed for the fit and fresh batches, "
                       f"only {n_train} available")
    fit_idx = perm[:args.refits * args.batch].reshape(args.refits, args.batch)
    fresh_idx = perm[args.refits * args.batch:need].reshape(args.fresh, args.batch)
    per_epoch = n_train // args.batch
    epochs = -(-args.adam_steps // per_epoch)
    adam_idx = np.concatenate([rng.permutation(n_train)[:per_epoch * args.batch]
                               .reshape(per_epoch, args.batch)
                               for _ in range(epochs)])[:args.adam_steps]

    params0 = net.init(k_init)
    layout = Layout(params0)
    kit = Kit(net, layout, args.num_chunks, args.ema, col_batch=256)
    x_j, y_j = jnp.asarray(x_all), jnp.asarray(y_all)
    params, adam_state, adam_losses = adam_train(net, params0, x_j, y_j, adam_idx,
                                                 args.adam_lr)
    u_adam = adam_diag(adam_state, layout)
    print(f"[{net.name}] {layout.size} params ({net.describe()}); Adam "
          f"{args.adam_steps} steps lr {args.adam_lr}: batch loss "
          f"{adam_losses[0]:.3f} -> {np.mean(adam_losses[-10:]):.3f}  "
          f"[{time.perf_counter() - t0:.1f}s]", flush=True)
    model_info.append(dict(
        name=net.name, num_params=layout.size, architecture=net.describe(),
        leaves={jax.tree_util.keystr(p): list(np.shape(v)) for p, v in
                jax.tree_util.tree_leaves_with_path(params0)},
        adam_steps=args.adam_steps, adam_lr=args.adam_lr,
        adam_first_loss=adam_losses[0],
        adam_last10_loss=float(np.mean(adam_losses[-10:]))))

    xs_fit, ys_fit = x_j[fit_idx], y_j[fit_idx]
    fit_keys = jax.vmap(lambda i: jax.random.fold_in(k_fit, i))(jnp.arange(args.refits))
    fresh = []
    for f in range(args.fresh):
      xb, yb = x_j[fresh_idx[f]], y_j[fresh_idx[f]]
      fresh.append(dict(x=xb, y=yb, g=layout.flat(kit.grad(params, xb, yb)),
                        key=jax.random.fold_in(k_fresh, f)))
    g_fresh_tree = [layout.tree(fb["g"]) for fb in fresh]
    # The refits' gradient samples, stacked (refit, chunk, ...).
    fit_grads = jax.tree.map(lambda *g: jnp.stack(g), *[
        kit.chunk_grads(params, xs_fit[r], ys_fit[r]) for r in range(args.refits)])
    check_structure = ("kronecker" if "kronecker" in args.structures
                       else args.structures[0])

    # K-FAC factors, averaged over the fit batches (independent of geometry).
    stats = [kit.kfac_stats(params, xs_fit[r], jax.random.fold_in(k_kfac, r))
             for r in range(args.refits)]
    kfac_factors = [(np.mean([np.asarray(s[l][0], np.float64) for s in stats], 0),
                     np.mean([np.asarray(s[l][1], np.float64) for s in stats], 0))
                    for l in range(len(net.layers))]

    leaf_blocks = layout.leaves
    layer_blocks = list(layout.layers.values())

    for geometry in args.geometries:
      tg = time.perf_counter()
      # Curvature of every fit batch and of each fresh batch.
      cb = safe_col_batch(geometry, args.batch * 10, kit.col_batch)
      c_fit32 = jnp.stack([kit.dense_c(params, xs_fit[r], ys_fit[r], fit_keys[r],
                                       geometry=geometry, col_batch=cb)
                           for r in range(args.refits)])
      c_fit = np.mean(np.asarray(c_fit32, np.float64), axis=0)
      c_fresh = [np.asarray(kit.dense_c(params, fb["x"], fb["y"], fb["key"],
                                        geometry=geometry, col_batch=cb), np.float64)
                 for fb in fresh]
      min_eig = None
      if geometry == "newton":
        min_eig = [smallest_eigenvalue(c) for c in c_fresh]
      t_curv = time.perf_counter() - tg

      for damping in args.dampings:
        eye = np.eye(layout.size)
        a_fit = c_fit + damping * eye
        status = "ok"
        fresh_solves = []
        for f, fb in enumerate(fresh):
          a = c_fresh[f] + damping * eye
          try:
            ainv_g = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), fb["g"])
          except np.linalg.LinAlgError:
            status, ainv_g = "indefinite", None
          fresh_solves.append((a, ainv_g))
        curvature_info.append(dict(
            model=net.name, geometry=geometry, damping=damping, status=status,
            min_eig_curvature_fresh=min_eig,
            trace_over_p_fresh=[float(np.trace(c)) / layout.size for c in c_fresh],
            seconds_dense_curvature=t_curv))

        def score(name, u_of_g, extra=None):
          """ρ on every fresh batch for ``u = u_of_g(f, g)``."""
          vals = None
          if status == "ok":
            vals = [rho(u_of_g(f, fb["g"]), fb["g"], fresh_solves[f][0],
                        float(fb["g"] @ fresh_solves[f][1]))
                    for f, fb in enumerate(fresh)]
          row = dict(model=net.name, geometry=geometry, damping=damping,
                     method=name, status=status,
                     rho=None if vals is None else float(np.mean(vals)),
                     rho_per_batch=vals)
          row.update(extra or {})
          rows.append(row)
          return row

        # The library's exact solve on the fresh batch: ρ = 1 iff our A, g match.
        exact_u = [layout.flat(kit.library_exact(params, fb["x"], fb["y"], fb["key"],
                                                 damping, geometry=geometry))
                   for fb in fresh]
        score("exact", lambda f, g: exact_u[f])
        score("identity", lambda f, g: g)
        score("adam_diag", lambda f, g: u_adam * g)
        score("diag_inverse_fit", lambda f, g: g / np.diag(a_fit))
        score("diag_inverse_oracle", lambda f, g: g / np.diag(fresh_solves[f][0]))
        g_all = np.stack([fb["g"] for fb in fresh], axis=1)  # (P, fresh)
        u_leaf = block_solve(a_fit, g_all, leaf_blocks)
        u_layer = block_solve(a_fit, g_all, layer_blocks)
        score("blockdiag_leaf_fit", lambda f, g: u_leaf[:, f])
        score("blockdiag_layer_fit", lambda f, g: u_layer[:, f])
        score("kfac_ideal_leaf",
              lambda f, g: block_solve(fresh_solves[f][0], g, leaf_blocks))
        score("kfac_ideal_layer",
              lambda f, g: block_solve(fresh_solves[f][0], g, layer_blocks))
        score("kfac", lambda f, g: kfac_apply(net, layout, kfac_factors, damping, g))
        fit_factor = Factor(a_fit)
        u_stale = fit_factor.solve(g_all)
        score("stale_exact", lambda f, g: u_stale[:, f],
              extra=dict(fit_curvature_positive_definite=fit_factor.positive_definite))

        def fit_and_score(structure, solver, steps, sink, extra=None):
          ts = time.perf_counter()
          states, objectives = kit.fit_dense(
              structures.init(params, structure), fit_grads, c_fit32,
              jnp.float32(damping), jnp.int32(steps), solver=solver)
          u_flat = [layout.flat(structures.apply(states, gt)) for gt in g_fresh_tree]
          info = dict(solver=solver, inner_steps=steps, refits=args.refits,
                      curvature_products=products_per_fit(
                          structure, solver, steps, args.refits, args.num_chunks,
                          params),
                      objectives=[float(o) for o in np.asarray(objectives)],
                      seconds=time.perf_counter() - ts, **(extra or {}))
          if sink is rows:
            return score(llqr_key(structure), lambda f, g: u_flat[f], extra=info)
          vals = [rho(u_flat[f], fb["g"], fresh_solves[f][0],
                      float(fb["g"] @ fresh_solves[f][1]))
                  for f, fb in enumerate(fresh)]
          row = dict(model=net.name, geometry=geometry, damping=damping,
                     structure=structure, rho=float(np.mean(vals)),
                     rho_per_batch=vals, **info)
          sink.append(row)
          return row

        for structure in args.structures:
          fit_and_score(structure, args.inner_solver, args.inner_steps, rows)
        line = "  ".join(f"{r['method'].replace('llqr_', '')} "
                         f"{'-' if r['rho'] is None else format(r['rho'], '.3f')}"
                         for r in rows if r["model"] == net.name
                         and r["geometry"] == geometry and r["damping"] == damping)
        print(f"[{net.name}] {geometry:16s} λ={damping:<4g} {status:10s} ρ: {line}  "
              f"[{time.perf_counter() - t0:.1f}s]", flush=True)

        if (geometry in args.check_geometries and status == "ok"
            and not any(c["model"] == net.name and c["geometry"] == geometry
                        for c in checks)):
          # The dense-product fit against the library's own build_problem path.
          structure = check_structure
          ts = time.perf_counter()
          states, _ = kit.fit_library(
              structures.init(params, structure), params, xs_fit, ys_fit, fit_keys,
              jnp.float32(damping), jnp.int32(args.inner_steps),
              geometry=geometry, solver="cg")
          u_lib = [layout.flat(structures.apply(states, gt)) for gt in g_fresh_tree]
          lib = [rho(u_lib[f], fb["g"], fresh_solves[f][0],
                     float(fb["g"] @ fresh_solves[f][1])) for f, fb in enumerate(fresh)]
          dense_row = [r for r in rows if r["model"] == net.name
                       and r["geometry"] == geometry and r["damping"] == damping
                       and r["method"] == llqr_key(structure)][0]
          checks.append(dict(model=net.name, geometry=geometry, damping=damping,
                             structure=structure, rho_build_problem=float(np.mean(lib)),
                             rho_dense_products=dense_row["rho"],
                             abs_difference=abs(float(np.mean(lib)) - dense_row["rho"]),
                             seconds=time.perf_counter() - ts))
          print(f"[{net.name}] check {geometry} λ={damping:g} {structure}: ρ with "
                f"build_problem {np.mean(lib):.4f}, with dense products "
                f"{dense_row['rho']:.4f}", flush=True)

        if geometry == args.compute_geometry and status == "ok":
          for structure in args.compute_structures:
            for solver, steps_list in (("cg", args.cg_steps), ("pcg", args.cg_steps),
                                       ("sgd", args.sgd_steps)):
              for steps in steps_list:
                fit_and_score(structure, solver, steps, compute_rows)
            cells = "  ".join(f"{r['solver']}{r['inner_steps']} {r['rho']:.3f}"
                              for r in compute_rows if r["model"] == net.name
                              and r["damping"] == damping
                              and r["structure"] == structure)
            print(f"[{net.name}] compute {geometry} λ={damping:g} {structure}: "
                  f"{cells}  [{time.perf_counter() - t0:.1f}s]", flush=True)
    trained += trained_rows(net, kit, layout, params0, x_j, y_j, adam_idx, fit_idx,
                            fresh_idx, args, jax.random.fold_in(key, 7))
    timings[net.name] = time.perf_counter() - tm

  wall = time.perf_counter() - t0
  args.out.mkdir(parents=True, exist_ok=True)
  meta = dict(
      script="benchmarks/quality.py", argv=argv,
      command=shlex.join(["python", "benchmarks/quality.py"] + argv),
      quick=args.quick, seed=args.seed, batch=args.batch, refits=args.refits,
      fresh_batches=args.fresh, dampings=args.dampings, geometries=args.geometries,
      renyi_alpha=RENYI_ALPHA, exact_cg_tol=CG_TOL, exact_cg_maxiter=CG_MAXITER,
      structures=args.structures,
      num_chunks=args.num_chunks, inner_steps=args.inner_steps, ema=args.ema,
      inner_solver=args.inner_solver, trained_configs=args.trained,
      cg_steps=args.cg_steps, sgd_steps=args.sgd_steps,
      compute_structures=args.compute_structures,
      compute_geometry=args.compute_geometry,
      check_geometries=args.check_geometries,
      loss=LOSS, dataset="MNIST-1D (mnist1d package, generated offline), "
      f"{n_train} training examples",
      wall_seconds=wall, seconds_per_model=timings,
      load_average_start=load_start,
      load_average_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
      **provenance(), jax=jax.__version__, optax=optax.__version__,
      numpy=np.__version__, llqr_optax=getattr(llqr_optax, "__version__", "0.1.0"),
      backend=jax.default_backend(), devices=str(jax.devices()),
      platform=platform.platform(),
      cpu_count=os.cpu_count(), python=platform.python_version())
  out = dict(meta=meta, methods=dict(BASELINES, **{
      llqr_key(s): f"llqr {s}, fitted on the fit batches" for s in ALL_STRUCTURES}),
      models=model_info, curvature=curvature_info, rows=rows, compute=compute_rows,
      checks=checks, trained=trained)
  js = args.out / "quality.json"
  js.write_text(json.dumps(out, indent=2) + "\n")
  pngs = plot(out, args.out)
  print(f"wrote {js} and {', '.join(str(p) for p in pngs)}; total {wall:.1f}s",
        flush=True)
  return out


# --------------------------------------------------------------------------
# Plots.


def method_order(rows) -> List[str]:
  present = {r["method"] for r in rows}
  order = list(BASELINES) + [llqr_key(s) for s in ALL_STRUCTURES]
  return [m for m in order if m in present]


def plot(out, folder: Path) -> List[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows, meta = out["rows"], out["meta"]
  models = [m["name"] for m in out["models"]]
  dampings = meta["dampings"]
  methods = method_order(rows)
  geoms = meta["geometries"]
  paths = []

  fig, axes = plt.subplots(len(models) * len(dampings), 1, squeeze=False,
                           figsize=(max(8, 0.75 * len(methods) * max(1, len(geoms)) / 3), 3.6 * len(models) * len(dampings)))
  width = 0.8 / max(1, len(geoms))
  colors = plt.get_cmap("tab10")
  for i, (model, damping) in enumerate([(m, d) for m in models for d in dampings]):
    ax = axes[i, 0]
    for j, geometry in enumerate(geoms):
      vals = []
      for method in methods:
        r = [r for r in rows if r["model"] == model and r["damping"] == damping
             and r["geometry"] == geometry and r["method"] == method]
        vals.append(r[0]["rho"] if r and r[0]["rho"] is not None else np.nan)
      ax.bar(np.arange(len(methods)) + (j - (len(geoms) - 1) / 2) * width, vals,
             width, label=geometry, color=colors(j))
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels([m.replace("llqr_", "llqr ") for m in methods],
                       rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ρ (fresh batch)")
    ax.set_title(f"{model}, λ = {damping:g}")
    ax.grid(True, axis="y", alpha=0.3)
    if i == 0:
      ax.legend(ncol=min(7, len(geoms)), fontsize=8, loc="upper right")
  fig.tight_layout()
  p = folder / "quality_rho.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  paths.append(p)

  comp = out["compute"]
  if comp:
    pairs = [(m, d) for m in models for d in dampings
             if any(r["model"] == m and r["damping"] == d for r in comp)]
    fig, axes = plt.subplots(1, len(pairs), squeeze=False,
                             figsize=(5.2 * len(pairs), 4.2))
    geometry = meta["compute_geometry"]
    for i, (model, damping) in enumerate(pairs):
      ax = axes[0, i]
      sel = [r for r in comp if r["model"] == model and r["damping"] == damping]
      for k, structure in enumerate(meta["compute_structures"]):
        for solver, style in (("cg", "-o"), ("pcg", "-^"), ("sgd", "--s")):
          pts = sorted((r["curvature_products"], r["rho"]) for r in sel
                       if r["structure"] == structure and r["solver"] == solver)
          if pts:
            ax.plot(*zip(*pts), style, color=colors(k), label=f"{structure} {solver}")
      for m, ls, col in (("kfac_ideal_layer", ":", "0.4"), ("kfac", "-.", "k"),
                         ("stale_exact", "--", "tab:purple")):
        r = [r for r in rows if r["model"] == model and r["damping"] == damping
             and r["geometry"] == geometry and r["method"] == m and r["rho"] is not None]
        if r:
          ax.axhline(r[0]["rho"], color=col, ls=ls, lw=1.2, label=m)
      ax.set_xscale("log")
      ax.set_ylim(0, 1.05)
      ax.set_xlabel(f"curvature products over {meta['refits']} refits")
      ax.set_ylabel("ρ (fresh batch)")
      ax.set_title(f"{model}, {geometry}, λ = {damping:g}")
      ax.grid(True, which="both", alpha=0.3)
      if i == 0:
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = folder / "quality_compute.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
  return paths


if __name__ == "__main__":
  main()
