"""Data parallelism: a batch sharded over 8 devices gives the one-device result.

The checks need 8 devices, and ``--xla_force_host_platform_device_count`` must
be set before JAX starts, which it already has in a pytest process that
imported other test modules. So one subprocess (this file run as a script,
with that flag) runs every configuration once and writes the largest
differences to a JSON file; the tests below read it.

One tiny MLP (8-16-4, Kronecker on the kernels, batch 64), ``chain(llqr,
adam)``, 4 steps with ``refit_every=4``: refits at steps 0, 1, 2, none at 3.
Compared with the one-device run, at every step: llqr's output ``U(g)`` (the
chain's update), the new params, and the whole optimizer state (llqr's and
Adam's).

- ``jit`` with ``NamedSharding``: the batch sharded over a ``'data'`` axis
  of an explicit mesh (the default of ``jax.make_mesh``); the compiled program
  is the one-device program partitioned, so chunk ``c`` is the same rows of
  the global batch.
- The preconditioner state sharded too (``jax.device_put`` with a
  ``NamedSharding`` per leaf, kept by ``out_shardings``), on an explicit and
  on an auto mesh: same result, and the state stays sharded.
- ``shard_map`` and ``pmap`` with ``llqr(axis_name="data")``: each device
  splits *its* shard into ``num_chunks`` chunks and the samples are averaged
  over devices, so sample ``c`` is the mean over the union of the devices'
  chunks ``c``. The matching one-device run is on the batch reordered so that
  its chunk ``c`` holds exactly those rows (:func:`chunk_order`).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

DEVICES = 8
#: Float32 reduction order differs between a sharded and a one-device run.
#: The preconditioned inner solver (the default) amplifies it in the state
#: through the inverse of the samples' Gram matrices, solved by Cholesky
#: with a relative jitter: measured 3.3e-7 (updates), 4.2e-7 (params) and
#: 8.3e-6 (state) on JAX 0.10.2, against 0.02 and 1.09 when the chunks differ
#: (``shard_map_vs_unordered``).
TOL = {"updates": 2e-6, "params": 2e-6, "state": 5e-5}
BATCH, D_IN, HIDDEN, D_OUT = 64, 8, 16, 4
NUM_CHUNKS, STEPS = 2, 4


def chunk_order(batch: int, devices: int, num_chunks: int) -> np.ndarray:
  """Row order of the one-device batch whose chunks match a sharded run.

  Device ``d`` holds rows ``[d·b, (d+1)·b)`` (``b = batch / devices``) and its
  chunk ``c`` is rows ``d·b + [c·s, (c+1)·s)`` (``s = b / num_chunks``); the
  one-device chunk ``c`` must be the union of those over ``d``.
  """
  local = batch // devices
  size = local // num_chunks
  return np.array([d * local + c * size + i for c in range(num_chunks)
                   for d in range(devices) for i in range(size)])


# --- the worker (runs in a subprocess with 8 host devices) ----------------------


def _worker(out_path):
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import llqr_optax
  from helpers import cross_entropy, max_abs_diff, mlp, mlp_params, run_steps

  assert jax.device_count() == DEVICES, jax.devices()
  explicit = jax.make_mesh((DEVICES,), ("data",))  # AxisType.Explicit by default
  auto = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))

  k = jax.random.split(jax.random.key(0), 4)
  params = mlp_params((D_IN, HIDDEN, D_OUT), k[:2])
  xs = jax.random.normal(k[2], (STEPS, BATCH, D_IN))
  ys = jax.random.randint(k[3], (STEPS, BATCH), 0, D_OUT)
  structure = lambda path, shape: "kronecker" if len(shape) == 2 else "diagonal"
  kw = dict(loss="softmax_cross_entropy", structure=structure, refit_every=4,
            num_chunks=NUM_CHUNKS, inner_steps=3)

  def make_step(axis_name=None):
    tx = optax.chain(llqr_optax.llqr(axis_name=axis_name, **kw), optax.adam(1e-2))

    def step(p, s, x, y):
      apply_fn = lambda q: mlp(q, x)
      loss = lambda q: cross_entropy(apply_fn(q), y)
      if axis_name is None:
        g = jax.grad(loss)(p)
      else:  # the mean of the devices' local gradients (see docs/devices.md)
        g = jax.lax.pmean(
            jax.grad(loss)(jax.lax.pcast(p, axis_name, to="varying")), axis_name)
      u, s = tx.update(g, s, p, apply_fn=apply_fn, targets=y)
      return optax.apply_updates(p, u), s, u
    return tx, step

  run = lambda step, p, s, xs, ys: run_steps(step, p, s, xs[:STEPS], ys[:STEPS])
  max_diff = max_abs_diff

  def compare(ref, got):
    return {part: max(max_diff(r[i], g[i]) for r, g in zip(ref, got))
            for i, part in enumerate(("updates", "params", "state"))}

  tx, step = make_step()
  s0 = tx.init(params)
  results = {}
  single = run(jax.jit(step), params, s0, xs, ys)
  order = chunk_order(BATCH, DEVICES, NUM_CHUNKS)
  single_reordered = run(jax.jit(step), params, s0, xs[:, order], ys[:, order])
  llqr_of = llqr_optax.find_state
  results["refits"] = int(llqr_of(single[-1][2]).refits)

  def batch_on(mesh):
    data = NamedSharding(mesh, P(None, "data"))
    return jax.device_put(xs, data), jax.device_put(ys, data)

  def replicated(mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P()))

  # 1. jit on the explicit mesh, batch sharded, params and state replicated.
  got = run(jax.jit(step), replicated(explicit, params), replicated(explicit, s0),
            *batch_on(explicit))
  results["jit"] = compare(single, got)
  results["jit"]["x_sharding"] = str(batch_on(explicit)[0].sharding.spec)

  # 2. jit, batch and preconditioner state sharded, on both kinds of mesh.
  def state_sharding(mesh):
    def leaf(x):
      big = x.ndim >= 1 and x.shape[0] % DEVICES == 0 and x.size >= 64
      return NamedSharding(mesh, P("data") if big else P())
    return jax.tree.map(leaf, s0)

  for name, mesh in (("sharded_state_auto", auto), ("sharded_state_explicit", explicit)):
    ssh = state_sharding(mesh)
    psh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    stepj = jax.jit(step, out_shardings=(psh, ssh, psh))
    got = run(stepj, replicated(mesh, params), jax.device_put(s0, ssh),
              *batch_on(mesh))
    results[name] = compare(single, got)
    final = llqr_of(got[-1][2]).preconditioner
    sharded = [x for x in jax.tree.leaves(final) if x.sharding.spec == P("data")]
    results[name]["sharded_leaves"] = len(sharded)
    results[name]["all_split"] = all(
        x.addressable_shards[0].data.shape[0] * DEVICES == x.shape[0] for x in sharded)
    results[name]["largest_sharded"] = max(x.size for x in sharded)

  # The refit of the one-step program on the auto mesh: which arrays does it
  # gather? (Chunking the batch by a slice once gathered the outputs and the
  # targets onto every device.)
  xb, yb = batch_on(auto)
  hlo = jax.jit(step).lower(replicated(auto, params), replicated(auto, s0),
                            xb[0], yb[0]).compile().as_text()
  results["auto_gathers"] = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather", hlo)

  # 3. shard_map and pmap with axis_name: the reordered one-device run.
  _, step_mapped = make_step("data")
  specs = dict(in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P(), P()))
  mapped = jax.jit(jax.shard_map(step_mapped, mesh=auto, **specs))
  got = run(mapped, replicated(auto, params), replicated(auto, s0), xs, ys)
  results["shard_map"] = compare(single_reordered, got)
  results["shard_map_vs_unordered"] = compare(single, got)

  # pmap: no varying-axes types (products are local without help).
  pmapped = jax.pmap(step_mapped, axis_name="data", in_axes=(None, None, 0, 0),
                     out_axes=None)
  per_device = lambda a: a.reshape((STEPS, DEVICES, -1) + a.shape[2:])
  got = run(pmapped, params, s0, per_device(xs), per_device(ys))
  results["pmap"] = compare(single_reordered, got)

  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


# --- the tests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("parallel") / "results.json"
  flags = os.environ.get("XLA_FLAGS", "")
  # The suite's XLA flags (tests/conftest.py) come with ``flags``; every run
  # compared is compiled with the same flags.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES}"}
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(out.read_text())


def _assert_matches(entry):
  for part in ("updates", "params", "state"):
    assert entry[part] <= TOL[part], (part, entry)


def test_the_run_refits(results):
  assert results["refits"] == 3  # steps 0, 1, 2; step 3 only preconditions


def test_jit_with_sharded_batch_matches_one_device(results):
  assert "'data'" in results["jit"]["x_sharding"]  # the batch axis is split
  _assert_matches(results["jit"])


@pytest.mark.parametrize("name", ["sharded_state_auto", "sharded_state_explicit"])
def test_sharded_preconditioner_state_matches_and_stays_sharded(results, name):
  _assert_matches(results[name])
  entry = results[name]
  # The Kronecker factors (16×16) and the large diagonals stay split over
  # the 8 devices, one eighth of the rows each.
  assert entry["sharded_leaves"] >= 3 and entry["all_split"], entry
  assert entry["largest_sharded"] == HIDDEN * HIDDEN


@pytest.mark.parametrize("name", ["shard_map", "pmap"])
def test_axis_name_matches_one_device_with_chunk_order(results, name):
  _assert_matches(results[name])


def test_axis_name_chunks_are_per_device(results):
  # Without the reordering the samples differ, so the fitted preconditioner
  # (hence updates and state) does: the equivalence above is not vacuous.
  assert results["shard_map_vs_unordered"]["state"] > 100 * TOL["state"]
  assert results["shard_map_vs_unordered"]["updates"] > 100 * TOL["updates"]


def test_refit_gathers_no_batch_sized_array_on_an_auto_mesh(results):
  """The chunks are the batch reshaped, not sliced: XLA keeps each device's
  rows where they are (no all-gather of the outputs ``f32[64,4]`` or the
  targets ``s32[64]``, as when chunks were sliced)."""
  batch_sized = [g for g in results["auto_gathers"] if g.split("[")[1].startswith(f"{BATCH}")]
  assert not batch_sized, results["auto_gathers"]


def test_chunk_order():
  order = chunk_order(16, 2, 2)  # two devices of 8 rows, chunks of 4
  assert order.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]


if __name__ == "__main__":
  _worker(sys.argv[1])
