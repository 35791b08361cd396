"""The scaling model (benchmarks/scaling/model.py) against the code it models.

Small models, so that it cannot drift from the library: the state bytes of
every structure exactly (``find_state(tx.init(params)).preconditioner``, and
``jax.eval_shape`` of GPT-3 125M's), the FLOPs of a refit within 25 % of
XLA's count of the lowered step (``refit=True`` minus ``refit=False``; XLA
also counts the elementwise work the model leaves out), and the bytes of the
collectives of a step and a refit, compiled for 8 host devices (a
subprocess), to the few bytes of scalar reductions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llqr_optax
from benchmarks.scaling import model as sm
from benchmarks.scaling import run as sc

OPTS = sc.llqr_defaults()
MODELS = sc.small_models()


def _params(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))


@pytest.mark.parametrize("case", MODELS, ids=lambda c: c[0])
def test_shapes_are_the_models(case):
  _, model, x, _, shapes, _, _ = case
  assert sc._flat_shapes(_params(model, x)) == shapes


def test_gpt_parameter_counts():
  counts = {size: sum(int(np.prod(s)) for s in sm.transformer_shapes(
      sm.VOCAB, sm.CONTEXT, cfg["d_model"], cfg["layers"]).values())
      for size, cfg in sm.GPT.items()}
  assert round(counts["125M"] / 1e6) == 125 and round(counts["1.3B"] / 1e8) == 13, counts


@pytest.mark.parametrize("max_dim", [1024, 32])  # 32: 40- and 64-wide sides fall back
@pytest.mark.parametrize("structure", sc.STRUCTURES)
@pytest.mark.parametrize("case", MODELS, ids=lambda c: c[0])
def test_state_bytes_exact(case, structure, max_dim):
  _, model, x, _, shapes, _, _ = case
  opts = {**OPTS, "max_dim": max_dim}
  tx = llqr_optax.llqr(loss="softmax_cross_entropy", structure=structure, max_dim=max_dim)
  state = jax.eval_shape(tx.init, _params(model, x))
  measured = sum(a.size * a.dtype.itemsize
                 for a in jax.tree.leaves(llqr_optax.find_state(state).preconditioner))
  names = sc.resolved_names(structure, shapes, opts)
  assert measured == 4 * sum(sm.state_floats(names[k], s, max_dim) for k, s in shapes.items())


def test_state_bytes_of_a_real_init():
  _, model, x, _, shapes, _, _ = MODELS[0]
  params = model.init(jax.random.PRNGKey(0), x)
  state = llqr_optax.llqr(loss="softmax_cross_entropy", structure="kronecker").init(params)
  measured = sum(a.nbytes for a in jax.tree.leaves(llqr_optax.find_state(state).preconditioner))
  names = sc.resolved_names("kronecker", shapes, OPTS)
  assert measured == 4 * sum(sm.state_floats(names[k], s) for k, s in shapes.items())


@pytest.mark.parametrize("structure", ["diagonal", "kronecker", "ekfac"])
def test_gpt_125m_state_bytes(structure):
  cfg = sm.GPT["125M"]
  shapes = sm.transformer_shapes(sm.VOCAB, sm.CONTEXT, cfg["d_model"], cfg["layers"])
  tree = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  state = jax.eval_shape(llqr_optax.llqr(loss="softmax_cross_entropy",
                                         structure=structure).init, tree)
  measured = sum(a.size * 4 for a in jax.tree.leaves(llqr_optax.find_state(state).preconditioner))
  names = sc.resolved_names(structure, shapes, OPTS)
  assert measured == 4 * sum(sm.state_floats(names[k], s) for k, s in shapes.items())


def test_bad_max_dim_is_a_value_error():
  with pytest.raises(ValueError, match="--max-dim=0"):
    sc.main(["--max-dim", "0"])


def test_dense_is_not_applicable_to_gpt():
  rows = [r for r in sc.gpt_rows(OPTS) if r["structure"] == "dense"]
  assert len(rows) == 2 and all("dense_max" in r["not_applicable"] for r in rows)


@pytest.mark.parametrize("structure", ["diagonal", "kronecker"])
def test_refit_flops_near_xla(structure):
  _, model, x, y, shapes, first, attention = MODELS[0]
  params = model.init(jax.random.PRNGKey(0), x)
  tx, step = sc._step(model, structure)
  state = tx.init(params)
  flops = {r: jax.jit(lambda p, s, a, b, r=r: step(p, s, a, b, refit=r)).lower(
      params, state, x, y).cost_analysis()["flops"] for r in (True, False)}
  f, f_prime = sm.forward_flops(shapes, x.shape[0], attention=attention, first=first)
  names = sc.resolved_names(structure, shapes, OPTS)
  predicted = sm.refit_flops(names, shapes, f, f_prime, num_chunks=OPTS["num_chunks"],
                             inner_steps=OPTS["inner_steps"], first_refit=True,
                             guard_branch=True)["total"]
  assert 0.8 < (flops[True] - flops[False]) / predicted < 1.25, (flops, predicted)


def test_collective_bytes_parser():
  text = ("%a = (f32[10,64]{1,0}, f32[]) all-reduce(%x, %y), channel_id=1\n"
          "%b = s32[64]{0} all-gather(%p), dimensions={0}\n"
          "%c = f32[8]{0} add(%d, %e)\n")
  assert sc.collective_bytes(text) == {"all-reduce": 2564, "all-gather": 256}


def test_data_parallel_bytes_match_compiled_hlo():
  got = sc.run_hlo_check(("diagonal",))["diagonal"]
  pred = got["predicted"]
  scalars = 16  # a few float32 scalars (the losses) are all-reduced too
  assert set(got["step"]) == {"all-reduce"}
  assert 0 <= got["step"]["all-reduce"] - pred["step"] <= scalars, got
  refit = got["refit_step"]["all-reduce"] - got["step"]["all-reduce"]
  assert 0 <= refit - pred["refit"] <= scalars, got
  # On this auto mesh the refit's chunks are the batch reshaped: no gather of
  # the outputs or targets (the model's refit_jit_gather is the explicit-axes
  # cost, where the chunks are sliced from a replicated copy).
  assert "all-gather" not in got["refit_step"], got
  assert pred["refit_jit_gather"] > 0
