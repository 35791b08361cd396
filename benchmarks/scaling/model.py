r"""A cost model of llqr from parameter shapes: state, refit FLOPs, communication.

Pure Python (no JAX): everything follows from the leaves' shapes, the batch
and llqr's options, counted from the code of :mod:`llqr_optax.fitting` and
:mod:`llqr_optax.structures` (``tests/test_scaling.py`` checks it against
the library's own states, XLA's FLOP counts and the collectives of compiled
sharded steps, so the model cannot drift from the code).

**State** (float32 values per leaf seen as an ``m × n`` matrix, ``side(k) =
k²`` for ``k ≤ max_dim``, else ``k``): scalar 1, diagonal ``mn``, Kronecker
``side(m) + side(n)``, ekfac ``mn + 2 side(m) + 2 side(n)``, dense ``(mn)²``.

**Refit FLOPs.** With ``F`` the forward FLOPs of the refit batch and ``F'``
those of the layers whose inputs depend on the params (all but a first layer
fed by data), one curvature product is a ``jvp`` and a transposed ``jvp`` of
the linearised model, a sample one transposed ``jvp``:

.. math::

   \text{refit} = \underbrace{2F}_{\text{linearise},\ \hat\rho}
     + n_c (F + F') + n_c K (2F + 2F') + a\, n_c\, \textstyle\sum_l u_l,

``n_c = num_chunks`` samples, ``K = inner_steps + 1`` products per sample for
one block (``fitting.cg_block`` with its own products), ``2 inner_steps + 3``
for two (Kronecker: a CG per block, then an evaluation), ``u_l`` the FLOPs of
applying ``U_l`` to one leaf, ``a = 3 + 2·inner_steps`` applications per
sample for one block and ``7 + 4·inner_steps`` for two (the fit's forward and
pullback, the block preconditioner's statistics). The first refit also
rescales ``U``: ``n_c`` more products and applications. The loss guard's
stand-down (:mod:`llqr_optax.safety`) is a branch of ``n_c`` more products
that runs on a trip only; XLA counts it in a compiled step
(``guard_branch``). Inverses and
eigendecompositions of the factors (``O(side³)`` a refit) are left out.

**Communication** (bytes of the full arrays the collectives of a step reduce
or gather, float32): data parallelism all-reduces the gradient (``4P``
bytes) every step; a refit all-reduces its ``n_c`` samples and each of its
``n_c K`` curvature products (``4P`` each; the second block's products only
on the leaves that have one: XLA drops the rest). Under ``jit`` on explicit
mesh axes (or when ``n_c`` does not divide the batch) a refit also
all-gathers the model's outputs and targets, its chunks then being slices of
a replicated copy; on auto axes the chunks are the batch reshaped and
nothing is gathered, and ``axis_name`` chunks each device's own rows. FSDP (params, grads and state
sharded ``1/D``) all-gathers the params twice (forward, backward) and
reduce-scatters the gradient every step; a refit gathers the params for its
linearisation and its ``ρ̂`` forward, gathers every product's tangent and
reduce-scatters its result and every sample. Ring collectives move about
``(D − 1)/D`` of these bytes per device (twice for an all-reduce).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Tuple

Shape = Tuple[int, ...]

#: GPT-3 paper shapes (Brown et al. 2020, Table 2.1): layers, width, heads,
#: and the batch in tokens; vocab 50257, context 2048, tied embeddings.
GPT = {
    "125M": dict(layers=12, d_model=768, heads=12, batch_tokens=2 ** 19),
    "1.3B": dict(layers=24, d_model=2048, heads=24, batch_tokens=2 ** 20),
}
VOCAB, CONTEXT = 50257, 2048


def transformer_shapes(vocab: int, context: int, d_model: int, layers: int,
                       tied: bool = True) -> Dict[str, Shape]:
  """The leaves of a pre-LayerNorm GPT (``benchmarks.models.CharTransformer``'s
  names, ``/``-joined): token and position embeddings, per layer LayerNorms,
  ``qkv``/``out`` attention kernels, a 4× MLP (``fc``, ``proj``), biases, a
  final LayerNorm and (``tied=False``) a head; ``tied`` reuses the token
  embedding as the head (GPT-2/3)."""
  d = d_model
  shapes = {"embed/embedding": (vocab, d), "pos": (context, d)}
  dense = lambda name, i, o: {f"{name}/kernel": (i, o), f"{name}/bias": (o,)}
  norm = lambda name: {f"{name}/scale": (d,), f"{name}/bias": (d,)}
  for i in range(layers):
    p = f"layer{i}/"
    for k, v in {**norm("ln1"), **dense("attn/qkv", d, 3 * d),
                 **dense("attn/out", d, d), **norm("ln2"), **dense("fc", d, 4 * d),
                 **dense("proj", 4 * d, d)}.items():
      shapes[p + k] = v
  shapes.update(norm("ln_f"))
  if not tied:
    shapes.update(dense("head", d, vocab))
  return shapes


def mlp_shapes(d_in: int, widths: Iterable[int], classes: int) -> Dict[str, Shape]:
  """The leaves of ``benchmarks.models.MLP`` (``Dense_i`` layers, ``head``)."""
  sizes = [d_in, *widths, classes]
  shapes = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    name = "head" if i == len(sizes) - 2 else f"Dense_{i}"
    shapes[f"{name}/kernel"], shapes[f"{name}/bias"] = (a, b), (b,)
  return shapes


def matrix(shape: Shape) -> Tuple[int, int]:
  """``(fan_in, fan_out)``, as ``llqr_optax.structures.matrix_shape``."""
  if len(shape) <= 1:
    return math.prod(shape), 1
  return math.prod(shape[:-1]), shape[-1]


def _side(k: int, max_dim: int) -> int:
  return k * k if k <= max_dim else k


def state_floats(name: str, shape: Shape, max_dim: int = 1024) -> int:
  """Float32 values of one leaf's state under the (resolved) structure ``name``."""
  m, n = matrix(shape)
  size = m * n
  return {"scalar": 1, "diagonal": size,
          "kronecker": _side(m, max_dim) + _side(n, max_dim),
          "ekfac": size + 2 * (_side(m, max_dim) + _side(n, max_dim)),
          "dense": size * size}[name]


def apply_flops(name: str, shape: Shape, max_dim: int = 1024) -> int:
  """FLOPs of applying one leaf's ``U`` to one array (multiply-adds as 2)."""
  m, n = matrix(shape)
  left = 2 * m * m * n if m <= max_dim else m * n
  right = 2 * m * n * n if n <= max_dim else m * n
  return {"scalar": m * n, "diagonal": m * n, "kronecker": left + right,
          "ekfac": 2 * (left + right) + m * n, "dense": 2 * (m * n) ** 2}[name]


def forward_flops(shapes: Mapping[str, Shape], tokens: int, *, attention=None,
                  first: Optional[str] = None) -> Tuple[int, int]:
  """``(F, F')``: forward FLOPs of ``tokens`` rows through every 2-D kernel
  (``2·tokens·m·n``, the tied head included via ``attention``), and without
  the ``first`` kernel (fed by data: its input has no tangent).

  ``attention = (layers, context, d_model, vocab_head)`` adds the full
  (masked, not halved) score and value products, ``4·layers·context·d``
  per token, and a tied head ``2·d·vocab`` per token.
  """
  f = sum(2 * tokens * math.prod(s) for k, s in shapes.items()
          if len(s) == 2 and k.endswith("kernel"))
  if attention is not None:
    layers, context, d, vocab = attention
    f += tokens * (4 * layers * context * d + 2 * d * vocab)
  first_f = 2 * tokens * math.prod(shapes[first]) if first else 0
  return f, f - first_f


def refit_flops(names: Mapping[str, str], shapes: Mapping[str, Shape],
                f: int, f_prime: int, *, num_chunks: int = 4, inner_steps: int = 3,
                first_refit: bool = False, guard_branch: bool = False,
                max_dim: int = 1024) -> Dict[str, int]:
  """FLOPs of one refit, split into the model's passes and the structures'
  applications (see the module docstring), with its number of curvature
  products: ``products`` in all, of which ``second_block`` are the second
  block's (Kronecker's right factors), whose results are used, hence
  reduced across devices, only on the leaves that have that block."""
  two = any(names[k] == "kronecker" for k in shapes)
  k_products = 2 * inner_steps + 3 if two else inner_steps + 1
  apps = 7 + 4 * inner_steps if two else 3 + 2 * inner_steps
  if first_refit:
    k_products, apps = k_products + 1, apps + 1
  if guard_branch:
    k_products += 1
  u = sum(apply_flops(names[k], s, max_dim) for k, s in shapes.items())
  passes = 2 * f + num_chunks * (f + f_prime) + num_chunks * k_products * (2 * f + 2 * f_prime)
  return {"passes": passes, "structures": num_chunks * apps * u,
          "products": num_chunks * k_products,
          "second_block": num_chunks * (inner_steps + 1) if two else 0,
          "total": passes + num_chunks * apps * u}


def communication(params: int, *, products: int, second_block: int = 0,
                  second_block_params: int = 0, num_chunks: int = 4,
                  gathered_state: int = 0, outputs: int = 0) -> Dict[str, Dict[str, int]]:
  """Bytes of the collectives of an ordinary step (``step``) and of a refit's
  extra (``refit``), float32, counted as the full array each one reduces or
  gathers (an all-reduce's operand, an all-gather's result, a
  reduce-scatter's operand), under data parallelism (``jit`` with a sharded
  batch, or ``axis_name``) and FSDP.

  Args:
    params: number of parameters ``P``.
    products: curvature products of a refit (:func:`refit_flops`).
    second_block: of which the second block's, reduced over the
      ``second_block_params`` entries of the leaves that have one.
    num_chunks: gradient samples of a refit.
    gathered_state: state values FSDP gathers to apply ``U`` (the two-sided
      structures' factors; elementwise structures need none).
    outputs: elements of the batch's outputs and targets, which ``jit`` on
      explicit mesh axes all-gathers for the chunks (auto axes and
      ``axis_name`` do not).
  """
  p = 4 * params
  reduced = (num_chunks + products - second_block) * p + second_block * 4 * second_block_params
  dp = {"step": p, "refit": reduced, "refit_jit_gather": 4 * outputs}
  fsdp = {"step": 3 * p + 4 * gathered_state,
          "refit": 2 * p + num_chunks * p + 2 * products * p}
  return {"dp": dp, "fsdp": fsdp}


def amortised(step: int, refit: int, refit_every: int) -> float:
  """Bytes (or FLOPs) per step: an ordinary step plus ``1/refit_every`` refit."""
  return step + refit / refit_every
