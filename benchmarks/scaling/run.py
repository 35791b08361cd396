"""How llqr's costs scale to GPT-3 125M and 1.3B: state, refit FLOPs, bytes.

A model, not a run: :mod:`benchmarks.scaling.model` derives every number from
the parameter shapes, the batch and llqr's defaults, per structure, under
data parallelism (``D`` replicas, state replicated) and FSDP (params, grads
and state sharded ``1/D``). ``--check`` also measures the model against small
models on this machine: the library's state bytes, XLA's FLOP count of a
refit (``cost_analysis``) and the collectives of a compiled sharded step on
8 host devices (a subprocess). Writes ``scaling.json`` to ``--out``.

Run: ``python -m benchmarks.scaling [--check] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, Mapping

from benchmarks import provenance as provenance_lib
from benchmarks.cli import add_out
from benchmarks.formatting import table
from benchmarks.scaling import model as sm

STRUCTURES = ("scalar", "diagonal", "kronecker", "ekfac", "dense", "auto")
#: bytes per element of the HLO types the collectives move.
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "f64": 8, "s64": 8,
          "pred": 1, "s8": 1, "u8": 1}
_COLLECTIVE = re.compile(
    r"=\s*(\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def llqr_defaults() -> Dict[str, Any]:
  """``num_chunks``, ``inner_steps``, ``refit_every``, ``max_dim``,
  ``dense_max`` from ``llqr_optax.scale_by_llqr``'s signature."""
  import llqr_optax
  params = inspect.signature(llqr_optax.scale_by_llqr).parameters
  return {k: params[k].default for k in
          ("num_chunks", "inner_steps", "refit_every", "max_dim", "dense_max")}


def resolved_names(structure: str, shapes: Mapping[str, tuple], opts) -> Dict[str, str]:
  """The structure of every leaf by llqr's own rule (``"auto"``, fallbacks);
  raises ``ValueError`` where ``structure`` cannot serve a leaf (dense)."""
  import jax
  from llqr_optax import structures
  tree = {k: jax.ShapeDtypeStruct(s, "float32") for k, s in shapes.items()}
  return structures.leaf_names(structure, tree, max_dim=opts["max_dim"],
                               dense_max=opts["dense_max"])


def gpt_rows(opts) -> list:
  """One row per GPT size and structure (see the module docstring)."""
  rows = []
  for size, cfg in sm.GPT.items():
    shapes = sm.transformer_shapes(sm.VOCAB, sm.CONTEXT, cfg["d_model"], cfg["layers"])
    params = sum(math_prod(s) for s in shapes.values())
    tokens = cfg["batch_tokens"]
    f, f_prime = sm.forward_flops(
        shapes, tokens, attention=(cfg["layers"], sm.CONTEXT, cfg["d_model"], sm.VOCAB))
    for structure in STRUCTURES:
      row = dict(model=f"GPT-3 {size}", params=params, tokens=tokens, structure=structure,
                 train_step_flops=3 * f)
      try:
        names = resolved_names(structure, shapes, opts)
      except ValueError as e:
        rows.append({**row, "not_applicable": str(e)})
        continue
      state = sum(sm.state_floats(names[k], s, opts["max_dim"]) for k, s in shapes.items())
      two_sided = sum(sm.state_floats(names[k], s, opts["max_dim"]) for k, s in shapes.items()
                      if names[k] in ("kronecker", "ekfac"))
      flops = sm.refit_flops(names, shapes, f, f_prime, num_chunks=opts["num_chunks"],
                             inner_steps=opts["inner_steps"], max_dim=opts["max_dim"])
      comm = sm.communication(
          params, products=flops["products"], second_block=flops["second_block"],
          second_block_params=second_block_params(names, shapes),
          num_chunks=opts["num_chunks"], gathered_state=two_sided,
          outputs=tokens * (sm.VOCAB + 1))
      rows.append({**row, "state_bytes": 4 * state, "refit_flops": flops, "comm": comm,
                   "names": sorted(set(names.values()))})
  return rows


def second_block_params(names, shapes) -> int:
  """Parameters of the leaves with a second fitted block (Kronecker)."""
  return sum(math_prod(s) for k, s in shapes.items() if names[k] == "kronecker")


def math_prod(shape) -> int:
  out = 1
  for s in shape:
    out *= s
  return out


def render(rows, opts) -> str:
  """The Markdown table of :func:`gpt_rows`."""
  every = opts["refit_every"]
  g = lambda b: f"{b / 1e9:.3g}"
  head = ["model", "structure", "state GB (× params)", "refit TFLOP (× train step)",
          f"refit amortised over {every} steps (% of a step)", "DP GB step (refit)", "DP GB/step amortised",
          "refit gather, explicit axes, GB", "FSDP GB step (refit)", "FSDP GB/step amortised"]
  out = []
  for r in rows:
    if "not_applicable" in r:
      out.append([r["model"], r["structure"],
                  f"n/a: leaves above dense_max={opts['dense_max']}"] + [""] * (len(head) - 3))
      continue
    fl, dp, fs = r["refit_flops"], r["comm"]["dp"], r["comm"]["fsdp"]
    step = r["train_step_flops"]
    out.append([
        r["model"], r["structure"],
        f"{g(r['state_bytes'])} ({r['state_bytes'] / (4 * r['params']):.2f})",
        f"{fl['total'] / 1e12:.4g} ({fl['total'] / step:.1f})",
        f"+{100 * fl['total'] / every / step:.1f} %",
        f"{g(dp['step'])} ({g(dp['refit'])})", g(sm.amortised(dp["step"], dp["refit"], every)),
        g(dp["refit_jit_gather"]),
        f"{g(fs['step'])} ({g(fs['refit'])})", g(sm.amortised(fs["step"], fs["refit"], every))])
  return table(head, out)


# --- measurements on small models (--check, tests/test_scaling.py) ------------------


def collective_bytes(hlo_text: str) -> Dict[str, int]:
  """Result bytes of every collective in a compiled HLO text, by kind.

  An all-reduce's result is its operand; an all-gather's is ``D`` times its
  operand, a reduce-scatter's ``1/D``.
  """
  out: Dict[str, int] = {}
  for shapes, kind in _COLLECTIVE.findall(hlo_text):
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes):
      total += _BYTES.get(dtype, 4) * math_prod(int(d) for d in dims.split(",") if d)
    out[kind] = out.get(kind, 0) + total
  return out


def small_models():
  """``(name, model, x, y, shapes, first_kernel, attention)`` of the check:
  an MLP and a small CharTransformer (untied head)."""
  import jax.numpy as jnp
  from benchmarks.models import MLP, CharTransformer
  mlp = MLP(widths=(64,), classes=10, head_name="head")
  x, y = jnp.zeros((64, 40)), jnp.zeros((64,), jnp.int32)
  tf = CharTransformer(vocab=32, context=16, d_model=32, heads=2, layers=2)
  tx_, ty = jnp.zeros((8, 16), jnp.int32), jnp.zeros((8, 16), jnp.int32)
  return [
      ("mlp 40-64-10, batch 64", mlp, x, y, sm.mlp_shapes(40, (64,), 10),
       "Dense_0/kernel", None),
      ("transformer 2×32, ctx 16, batch 8", tf, tx_, ty,
       sm.transformer_shapes(32, 16, 32, 2, tied=False), None, (2, 16, 32, 0))]


def _flat_shapes(params) -> Dict[str, tuple]:
  import jax
  flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
  return {"/".join(str(k.key) for k in path): tuple(x.shape) for path, x in flat}


def _step(model, structure, **kw):
  import optax
  import llqr_optax
  from benchmarks.common import train_step
  from llqr_optax import _conv_layout
  tx = optax.chain(llqr_optax.llqr(loss="softmax_cross_entropy", structure=structure, **kw),
                   optax.adam(1e-3))
  step = train_step(model, tx, True)

  def unrolled_step(*args, **kwargs):
    # Traced with the inner solver unrolled: XLA counts a loop's body once.
    with _conv_layout.unrolled():
      return step(*args, **kwargs)
  return tx, unrolled_step


def check_model(model, x, y, shapes, first, attention, structure, opts) -> Dict[str, Any]:
  """Predicted against measured for one small model and structure: state
  bytes (``find_state(tx.init(params)).preconditioner``) and the FLOPs of a
  refit (XLA's count of the step with ``refit=True`` minus ``refit=False``;
  the first refit, as traced: XLA counts the rescaling branch of its
  ``lax.cond`` and the guard's stand-down)."""
  import jax
  import llqr_optax
  params = model.init(jax.random.PRNGKey(0), x)
  assert _flat_shapes(params) == dict(shapes), (_flat_shapes(params), shapes)
  names = resolved_names(structure, shapes, opts)
  tx, step = _step(model, structure)
  state = tx.init(params)
  measured = sum(a.nbytes for a in jax.tree.leaves(llqr_optax.find_state(state).preconditioner))
  predicted = 4 * sum(sm.state_floats(names[k], s, opts["max_dim"]) for k, s in shapes.items())
  flops = {}
  for refit in (True, False):
    c = jax.jit(lambda p, s, a, b, r=refit: step(p, s, a, b, refit=r)).lower(
        params, state, x, y).compile().cost_analysis()
    flops[refit] = (c[0] if isinstance(c, list) else c)["flops"]
  rows = x.shape[0] * (x.shape[1] if attention else 1)
  f, f_prime = sm.forward_flops(shapes, rows, attention=attention, first=first)
  model_flops = sm.refit_flops(names, shapes, f, f_prime, num_chunks=opts["num_chunks"],
                               inner_steps=opts["inner_steps"], first_refit=True,
                               guard_branch=True, max_dim=opts["max_dim"])
  return dict(structure=structure, state_bytes=measured, predicted_state_bytes=predicted,
              xla_refit_flops=flops[True] - flops[False],
              predicted_refit_flops=model_flops["total"])


def predicted_dp(structure, shapes, outputs, opts) -> Dict[str, int]:
  """The model's data-parallel bytes for a small model (the first refit)."""
  names = resolved_names(structure, shapes, opts)
  fl = sm.refit_flops(names, shapes, 1, 1, num_chunks=opts["num_chunks"],
                      inner_steps=opts["inner_steps"], first_refit=True,
                      guard_branch=True)
  return sm.communication(
      sum(math_prod(s) for s in shapes.values()), products=fl["products"],
      second_block=fl["second_block"],
      second_block_params=second_block_params(names, shapes),
      num_chunks=opts["num_chunks"], outputs=outputs)["dp"]


def hlo_worker(structures=("diagonal", "kronecker")) -> None:
  """(In a subprocess with 8 host devices.) The collectives of the MLP's
  step, refit and not, ``jit`` with the batch sharded over 8 devices; prints
  JSON."""
  import jax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  opts = llqr_defaults()
  name, model, x, y, shapes, first, attention = small_models()[0]
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = model.init(jax.random.PRNGKey(0), x)
  out = {}
  for structure in structures:
    tx, step = _step(model, structure)
    state = jax.eval_shape(tx.init, params)
    on = lambda t, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t)
    got = {}
    for refit in (True, False):
      text = jax.jit(lambda p, s, a, b, r=refit: step(p, s, a, b, refit=r)).lower(
          on(params, rep), on(state, rep), on(x, rows), on(y, rows)).compile().as_text()
      got[refit] = collective_bytes(text)
    out[structure] = dict(step=got[False], refit_step=got[True],
                          predicted=predicted_dp(structure, shapes, x.shape[0] * 11, opts))
  print(json.dumps(out))


def run_hlo_check(structures=("diagonal", "kronecker"), timeout: int = 600) -> Dict[str, Any]:
  """:func:`hlo_worker` in a subprocess with 8 host devices.

  Returns, per structure, the measured bytes by kind of collective of an
  ordinary step (``step``) and of a refit step (``refit_step``: the step's
  own collectives and the refit's), and the model's (``predicted``).
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
         + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--hlo-worker",
                         ",".join(structures)],
                        env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"the 8-device HLO check failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="also measure the model on small models (about a minute)")
  parser.add_argument("--max-dim", type=int, default=None,
                      help="llqr's max_dim (default: llqr's, 1024): sides above it "
                           "get diagonal factors (kronecker) or no basis (ekfac)")
  parser.add_argument("--hlo-worker", help=argparse.SUPPRESS)
  add_out(parser)
  args = parser.parse_args(argv)
  if args.max_dim is not None and args.max_dim < 1:
    raise ValueError(f"--max-dim={args.max_dim}: max_dim is the largest side held "
                     "as a matrix and must be at least 1; try 1024 or 8192.")
  if args.hlo_worker:
    return hlo_worker(tuple(args.hlo_worker.split(",")))
  opts = llqr_defaults()
  if args.max_dim is not None:
    opts["max_dim"] = args.max_dim
  print(f"llqr defaults: {opts}; batch per GPT-3 (0.5M / 1M tokens), float32", flush=True)
  rows = gpt_rows(opts)
  print(render(rows, opts), flush=True)
  meta = dict(provenance_lib.of_script(__file__, sm.__file__),
              assumptions="GPT-3 shapes (tied embeddings), batch 2^19 / 2^20 tokens, "
                          "float32, steady-state refits (no first-refit rescale)")
  report = dict(meta=meta, options=opts, rows=rows)
  if args.check:
    checks = []
    for name, *rest in small_models():
      for structure in ("diagonal", "kronecker", "ekfac"):
        print(f"check: {name}, {structure} ...", flush=True)
        checks.append(dict(model=name, **check_model(*rest, structure, opts)))
    print("check: collectives on 8 host devices (subprocess) ...", flush=True)
    report["checks"] = checks
    report["hlo"] = run_hlo_check()
    print(json.dumps(dict(checks=checks, hlo=report["hlo"]), indent=1))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {args.out / 'scaling.json'}")


if __name__ == "__main__":
  main()
