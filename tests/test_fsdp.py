"""FSDP: params split over a ``model`` axis, llqr's state split to match.

As in ``test_parallel.py``, one subprocess with 8 host devices runs every
configuration once and writes a JSON file that the tests read.

Model: an MLP 24-40-56-32-8 with a structure per leaf — ekfac on ``l0.w``
(its input layer: well-separated eigenvalues), diagonal on ``l1.w`` and
``l2.w``, Kronecker on ``l3.w``, scalar, diagonal and dense on the biases
(no bias init: zeros). FSDP layout: a leaf of rank >= 2 whose rows divide over the devices
is split by rows over ``model``; the biases are replicated. ``tx.init`` on the
split params returns the state split to match (llqr's and Adam's).

- **Memory**: per-device bytes of the preconditioner for ``D = 1, 2, 4, 8``.
- **Equality**: 4 steps (refits at 0, 1, 2) on the 8-device mesh against
  the one-device run: updates, params, whole state (ekfac's eigenvectors up
  to their signs, see ``TOL``); explicit axes here, auto axes in
  ``test_fsdp_auto.py`` (the same worker, run apart to keep each file short).
- **Communication**: the compiled explicit-mesh step (with the refit under
  ``lax.cond``) and the step without refit: no all-gather produces a split
  factor's full shape, except ekfac's row covariance, gathered once a refit
  for its eigendecomposition (XLA has no distributed ``eigh``).

- **Dense on a split leaf**: ``M`` replicated (dense is for tiny leaves),
  one refit step equal to the one-device step, ``M`` never gathered.

The side sizes are all different, and differ from the gradients' and
activations' shapes, so an array's shape says what it is.
"""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

DEVICES = 8
SIZES = (24, 40, 56, 32, 8)  # kernels (24, 40), (40, 56), (56, 32), (32, 8)
BATCH, STEPS = 64, 4
#: As ``test_parallel.TOL``: the split run sums in another order (partial
#: products reduced across devices); the preconditioned inner solver
#: amplifies that in the state. Measured on JAX 0.10.2 with the Cholesky
#: Gram solves, on explicit axes: 3.9e-6 and 5.2e-6 (updates), 5.9e-6 and
#: 6.6e-6 (params), 1.1e-5 and 1.2e-5 (state) in two sessions; a dense leaf
#: split 3.7e-5 (state).
TOL = {"updates": 1e-5, "params": 1e-5, "state": 1e-4,
       # ekfac's eigenvectors move by about the covariances' difference (4e-8
       # here) over their eigengap (Davis-Kahan), and the scales fitted in
       # that basis with them: measured 2.5e-4 (bases, each up to its sign)
       # and 3.5e-4 (scales, relative to the largest).
       "ekfac_bases": 1e-3, "ekfac_scale_relative": 1.5e-3}
#: On auto axes XLA picks the partial sums: measured 7.5e-6 and 1.1e-5
#: (updates), 1.1e-5 and 1.9e-5 (params), 1.7e-5 and 2.7e-5 (state) in two
#: sessions. The params differ most where Adam divides a tiny gradient
#: coordinate by its tiny second moment: Adam alone on the same mesh ends
#: 1.2e-7 apart, and with llqr the gradients at the same steps 1.8e-7 apart.
AUTO_TOL = {**TOL, "updates": 2e-5, "params": 3e-5}
#: Full shapes of the factors the FSDP layout splits: Kronecker's ``L`` of
#: ``l3.w`` and ekfac's ``Q_A``/``cov_in`` of ``l0.w``.
SPLIT_FACTORS = {"kronecker_left": "f32[32,32]", "ekfac_in": "f32[24,24]"}


def structure(path, shape):
  names = {("l0", "w"): "ekfac", ("l1", "w"): "diagonal", ("l2", "w"): "diagonal",
           ("l3", "w"): "kronecker", ("l0", "b"): "scalar", ("l1", "b"): "diagonal",
           ("l2", "b"): "diagonal", ("l3", "b"): "dense"}
  return names[tuple(k.key for k in path)]


def collectives(hlo: str) -> dict:
  """``{"op shape": count}`` of the collectives in a compiled HLO text."""
  found = re.findall(r"= (\S+?)(?:\{[^}]*\})? (all-gather|all-reduce|reduce-scatter|"
                     r"all-to-all|collective-permute)(?:-start)?\(", hlo)
  return dict(collections.Counter(f"{op} {shape}" for shape, op in found))


# --- the worker (runs in a subprocess with 8 host devices) ----------------------


def _worker(out_path, part):
  """``part``: ``"explicit"`` (memory, equality, communication, dense) or
  ``"auto"`` (equality on auto axes, ``test_fsdp_auto.py``)."""
  import jax
  import numpy as np
  import optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import llqr_optax
  from llqr_optax import structures
  from helpers import cross_entropy, max_abs_diff, mlp, mlp_params, run_steps

  assert jax.device_count() == DEVICES, jax.devices()
  k = jax.random.split(jax.random.key(0), 8)
  params = mlp_params(SIZES, k[:4], [None] * 4)
  xs = jax.random.normal(k[6], (STEPS, BATCH, SIZES[0]))
  ys = jax.random.randint(k[7], (STEPS, BATCH), 0, SIZES[-1])
  tx = optax.chain(
      llqr_optax.llqr(loss="softmax_cross_entropy", structure=structure,
                      refit_every=4, num_chunks=2, inner_steps=1),
      optax.adam(1e-2))

  def fsdp(mesh, tree):
    d = mesh.size
    split = lambda x: x.ndim >= 2 and x.shape[0] % d == 0
    return jax.tree.map(lambda x: NamedSharding(mesh, P("model") if split(x) else P()),
                        tree)

  def step(p, s, x, y, refit=None):
    apply_fn = lambda q: mlp(q, x)
    g = jax.grad(lambda q: cross_entropy(apply_fn(q), y))(p)
    u, s = tx.update(g, s, p, apply_fn=apply_fn, targets=y, refit=refit)
    return optax.apply_updates(p, u), s, u

  def precond_bytes(state):
    pre = llqr_optax.find_state(state).preconditioner
    per = structures.map_states(
        lambda cls, s: (cls.name, sum(x.addressable_shards[0].data.nbytes for x in s)), pre)
    out = collections.Counter()
    for name, n in jax.tree.leaves(per, is_leaf=lambda v: isinstance(v, tuple)):
      out[name] += n
    out["total"] = sum(out.values())
    return dict(out)

  results = {"bytes": {}}
  # 1. Memory: eager init on split params, and jit init with state_shardings.
  for d in ((1, 2, 4, 8) if part == "explicit" else ()):
    mesh = jax.make_mesh((d,), ("model",), devices=jax.devices()[:d])
    p = jax.device_put(params, fsdp(mesh, params))
    state = tx.init(p)
    want = llqr_optax.state_shardings(jax.eval_shape(tx.init, p), p)
    jitted = jax.jit(tx.init, out_shardings=want)(p)
    same = lambda a, b: all(  # llqr's state, and Adam's moments like the params
        x.sharding.is_equivalent_to(y.sharding, x.ndim) for x, y in zip(
            jax.tree.leaves((llqr_optax.find_state(a), a[1][0].mu)),
            jax.tree.leaves((llqr_optax.find_state(b), b[1][0].mu))))
    results["bytes"][str(d)] = precond_bytes(state)
    results[f"init_matches_{d}"] = same(state, jitted)
    with jax.set_mesh(mesh):  # explicit axes: the types carry the split
      results[f"jit_default_matches_{d}"] = same(state, jax.jit(tx.init)(p))

  # 2. Equality over 4 steps, and 3. the compiled programs' collectives.
  run = lambda fn, p, s: run_steps(fn, p, s, xs[:STEPS], ys[:STEPS])
  max_diff = max_abs_diff

  def ekfac(state):
    return llqr_optax.find_state(state).preconditioner["l0"]["w"]

  def without_bases(state):  # ekfac's basis and scale are compared apart
    e = ekfac(state)
    zeros = e._replace(**{f: np.zeros(()) for f in ("scale", "basis_in", "basis_out")})
    return jax.tree.map(lambda x: x is e and zeros or x, state,
                        is_leaf=lambda x: x is e)

  def up_to_sign(a, b):  # each eigenvector's sign is arbitrary
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.minimum(np.abs(a - b).max(0), np.abs(a + b).max(0))))

  def compare(ref, got):
    out = {"updates": max(max_diff(r[0], g[0]) for r, g in zip(ref, got)),
           "params": max(max_diff(r[1], g[1]) for r, g in zip(ref, got)),
           "state": max(max_diff(without_bases(r[2]), without_bases(g[2]))
                        for r, g in zip(ref, got)),
           "state_raw": max(max_diff(r[2], g[2]) for r, g in zip(ref, got))}
    out["ekfac_bases"] = max(up_to_sign(getattr(ekfac(r[2]), f), getattr(ekfac(g[2]), f))
                             for r, g in zip(ref, got) for f in ("basis_in", "basis_out"))
    out["ekfac_scale_relative"] = max(
        max_diff(ekfac(r[2]).scale, ekfac(g[2]).scale)
        / float(np.max(np.abs(ekfac(r[2]).scale))) for r, g in zip(ref, got))
    return out

  single = run(jax.jit(step), params, tx.init(params))
  results["refits"] = int(llqr_optax.find_state(single[-1][2]).refits)
  kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[part]
  for name in (part,):
    mesh = jax.make_mesh((DEVICES,), ("model",), axis_types=(kind,))
    p = jax.device_put(params, fsdp(mesh, params))
    s = tx.init(p)
    ssh = llqr_optax.state_shardings(s, p)
    psh = fsdp(mesh, params)
    rep = NamedSharding(mesh, P())
    stepj = jax.jit(step, out_shardings=(psh, ssh, psh))
    args = (p, s, jax.device_put(xs[0], rep), jax.device_put(ys[0], rep))
    compiled = stepj.lower(*args).compile()
    got = run(compiled, p, s)
    results[name] = compare(single, got)
    final = llqr_optax.find_state(got[-1][2]).preconditioner
    results[name]["final_specs"] = {
        jax.tree_util.keystr(path): str(x.sharding.spec)
        for path, x in jax.tree_util.tree_flatten_with_path(final)[0]}
    if name == "explicit":
      results["hlo_step"] = collectives(compiled.as_text())
      plain = jax.jit(lambda *a: step(*a, refit=False), out_shardings=(psh, ssh, psh))
      results["hlo_no_refit"] = collectives(plain.lower(*args).compile().as_text())
  if part == "explicit":
    results["dense_split"] = dense_on_a_split_leaf()
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


def dense_on_a_split_leaf():
  """``dense`` on a kernel split by rows: ``M`` replicated, one refit step."""
  import jax
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import llqr_optax
  from helpers import cross_entropy, mlp, mlp_params

  k = jax.random.split(jax.random.key(2), 4)
  params = mlp_params((16, 4), k[:1])  # w (16, 4): M is 64 x 64
  x, y = jax.random.normal(k[2], (32, 16)), jax.random.randint(k[3], (32,), 0, 4)
  tx = llqr_optax.llqr(loss="softmax_cross_entropy", structure="dense", num_chunks=2,
                       inner_steps=1, learning_rate=0.1)

  def step(p, s):
    apply_fn = lambda q: mlp(q, x)
    g = jax.grad(lambda q: cross_entropy(apply_fn(q), y))(p)
    u, s = tx.update(g, s, p, apply_fn=apply_fn, targets=y)
    return optax.apply_updates(p, u), s

  ref = jax.jit(step)(params, tx.init(params))
  mesh = jax.make_mesh((DEVICES,), ("model",))
  psh = {"l0": {"w": NamedSharding(mesh, P("model")), "b": NamedSharding(mesh, P())}}
  p = jax.device_put(params, psh)
  s = tx.init(p)
  compiled = jax.jit(step, out_shardings=(psh, llqr_optax.state_shardings(s, p))).lower(
      p, s).compile()
  got = compiled(p, s)
  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
  return {"max_diff": diff, "hlo": collectives(compiled.as_text()),
          "spec": str(llqr_optax.find_state(got[1]).preconditioner["l0"]["w"].matrix
                      .sharding.spec)}


# --- the tests -------------------------------------------------------------------


def run_worker(out, part: str) -> dict:
  """Runs :func:`_worker` in a subprocess with 8 host devices; its JSON."""
  flags = os.environ.get("XLA_FLAGS", "")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES}"}
  proc = subprocess.run([sys.executable, __file__, str(out), part], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return run_worker(tmp_path_factory.mktemp("fsdp") / "results.json", "explicit")


@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_init_is_sharded_like_the_params(results, d):
  # Eager init, jit init without out_shardings (explicit axes) and jit init
  # with state_shardings give the same shardings.
  assert results[f"init_matches_{d}"] and results[f"jit_default_matches_{d}"]


def test_split_fields_take_one_share_per_device(results):
  b = {int(d): v for d, v in results["bytes"].items()}
  m, n = SIZES[3], SIZES[4]   # l3.w, Kronecker: L split, R replicated
  mi, ni = SIZES[0], SIZES[1]   # l0.w, ekfac: S, Q_A, cov_in split
  for d in b:
    assert b[d]["kronecker"] == 4 * (m * m // d + n * n)
    assert b[d]["ekfac"] == 4 * (mi * ni // d + 2 * mi * mi // d + 2 * ni * ni)
    # l1.w and l2.w split by rows, l1.b and l2.b replicated.
    split = SIZES[1] * SIZES[2] + SIZES[2] * SIZES[3]
    assert b[d]["diagonal"] == 4 * (split // d + SIZES[2] + SIZES[3])
    assert b[d]["scalar"] == 4 and b[d]["dense"] == 4 * SIZES[4] ** 2


def test_the_run_refits(results):
  assert results["refits"] == 3  # steps 0, 1, 2; step 3 only preconditions


def assert_matches(entry, tol=TOL):
  for part in tol:
    assert entry[part] <= tol[part], (part, entry)


def assert_stays_split(specs):
  assert specs["['l3']['w'].left"] == "P('model', None)"
  assert specs["['l3']['w'].right"] == "P(None, None)"
  assert specs["['l1']['w'].diag"] == "P('model', None)"
  assert specs["['l1']['b'].diag"] == "P(None,)"
  for field in ("scale", "basis_in", "cov_in"):
    assert specs[f"['l0']['w'].{field}"] == "P('model', None)", field
  for field in ("basis_out", "cov_out"):
    assert specs[f"['l0']['w'].{field}"] == "P(None, None)", field


def test_fsdp_matches_one_device(results):
  assert_matches(results["explicit"])


def test_state_stays_split(results):
  assert_stays_split(results["explicit"]["final_specs"])


def _gathers(counts, shape):
  return sum(n for key, n in counts.items() if key == f"all-gather {shape}")


def test_step_gathers_no_split_factor(results):
  step, plain = results["hlo_step"], results["hlo_no_refit"]
  assert _gathers(step, SPLIT_FACTORS["kronecker_left"]) == 0, step
  assert _gathers(plain, SPLIT_FACTORS["kronecker_left"]) == 0, plain
  # ekfac: only its row covariance, once, for eigh in the refit; never in
  # the ordinary step.
  assert _gathers(step, SPLIT_FACTORS["ekfac_in"]) <= 1, step
  assert _gathers(plain, SPLIT_FACTORS["ekfac_in"]) == 0, plain


def test_what_is_communicated(results):
  # Gradient-sized gathers (the params for the forward pass, the gradient for
  # L·G and Q_A·X) and reductions; nothing else of a factor's size.
  allowed = {f"f32[{a},{b}]" for a, b in zip(SIZES[:-1], SIZES[1:])}
  for key in results["hlo_no_refit"]:
    op, shape = key.split(" ")
    assert shape in allowed or op == "all-reduce", key


def test_state_shardings_bad_params():
  import jax
  import jax.numpy as jnp
  import llqr_optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  tx = llqr_optax.llqr(loss="squared_error", structure="kronecker")
  params = {"w": jnp.zeros((4, 2))}
  shapes = jax.eval_shape(tx.init, params)
  with pytest.raises(ValueError, match="no NamedSharding.*SingleDeviceSharding"):
    llqr_optax.state_shardings(shapes, params)  # one device, not placed on a mesh
  mesh = jax.make_mesh((1,), ("model",))
  with pytest.raises(ValueError, match="shardings without shapes.*ShapeDtypeStruct"):
    llqr_optax.state_shardings(shapes, {"w": NamedSharding(mesh, P("model"))})


def test_dense_on_a_split_leaf(results):
  # M (64 x 64) stays replicated and is never gathered; the tiny leaf is.
  entry = results["dense_split"]
  assert entry["spec"] == "P()" and entry["max_diff"] <= TOL["state"], entry
  assert "all-gather f32[64,64]" not in entry["hlo"], entry


def test_collectives_parser():
  hlo = ("%all-gather.1 = f32[24,24]{1,0} all-gather(%p), dimensions={0}\n"
         "%ar = f32[40,48]{1,0} all-reduce(%d), channel_id=1\n"
         "%ag = f32[24,24]{0,1} all-gather-start(%q)\n")
  assert collectives(hlo) == {"all-gather f32[24,24]": 2, "all-reduce f32[40,48]": 1}


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
