"""Checkpoints: save with orbax mid-run, restore in a fresh process, continue.

The 50 steps after the restore must be bit-identical to the same 50 steps of
the run that never stopped: params, the whole optimizer state (llqr's
preconditioner, PRNG key, counters, damping, … and Adam's moments) and every
step's loss, compared bitwise.

Two subprocesses (this file run as a script) with the same environment:

1. ``first``: a tiny MLP trained with ``chain(llqr(...), adam(1e-2))``; at
   step ``SAVE`` the params, optimizer state and step are saved with
   ``orbax.checkpoint.StandardCheckpointer``; the run goes on for ``RESUMED``
   more steps and writes the final arrays.
2. ``resume``: a fresh process restores the checkpoint into the abstract
   tree of a newly built optimizer, runs the same ``RESUMED`` steps on the
   same batches, and writes its final arrays.

``geometry="mc_fisher"`` makes every refit draw labels with the state's PRNG
key, so a key that is not restored exactly changes the result. With
``refit_every=8`` the 50 resumed steps contain 7 refits.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

SAVE, RESUMED = 21, 50
BATCH, D_IN, HIDDEN, D_OUT = 32, 6, 12, 4


def _worker(mode, workdir):
  import jax
  import jax.numpy as jnp
  import optax
  import orbax.checkpoint as ocp

  import llqr_optax
  from helpers import classification_batch, cross_entropy, mlp, mlp_params

  tx = optax.chain(
      llqr_optax.llqr(loss="softmax_cross_entropy", geometry="mc_fisher",
                      refit_every=8, num_chunks=4, inner_steps=3),
      optax.adam(1e-2))

  def init_params():
    return mlp_params((D_IN, HIDDEN, D_OUT), jax.random.split(jax.random.key(0)))

  def batch(t):  # the batch of step t, in any process
    return classification_batch(jax.random.fold_in(jax.random.key(1), t), BATCH, D_IN,
                                D_OUT)

  @jax.jit
  def step(params, opt_state, x, y):
    apply_fn = lambda p: mlp(p, x)
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply_fn(p), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params, apply_fn=apply_fn, targets=y)
    return optax.apply_updates(params, updates), opt_state, loss

  def train(params, opt_state, start, stop):
    losses = []
    for t in range(start, stop):
      params, opt_state, loss = step(params, opt_state, *batch(t))
      losses.append(loss)
    return params, opt_state, losses

  def write(name, params, opt_state, losses):
    leaves = jax.tree.leaves((params, opt_state))
    inner = llqr_optax.find_state(opt_state)
    np.savez(os.path.join(workdir, name), losses=np.asarray(losses),
             refits=np.asarray(inner.refits), skipped=np.asarray(inner.skipped_refits),
             **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)})

  path = os.path.join(workdir, "checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  params = init_params()
  fresh = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  if mode == "first":
    params, opt_state, _ = train(fresh["params"], fresh["opt_state"], 0, SAVE)
    checkpointer.save(path, {"params": params, "opt_state": opt_state,
                             "step": jnp.int32(SAVE)})
    checkpointer.wait_until_finished()
    params, opt_state, losses = train(params, opt_state, SAVE, SAVE + RESUMED)
    write("uninterrupted.npz", params, opt_state, losses)
  else:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
    restored = checkpointer.restore(path, target)
    start = int(restored["step"])
    assert start == SAVE
    assert jax.tree.structure(restored) == jax.tree.structure(fresh)
    params, opt_state, losses = train(restored["params"], restored["opt_state"],
                                      start, start + RESUMED)
    write("resumed.npz", params, opt_state, losses)
  checkpointer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("checkpoint")
  flags = os.environ.get("XLA_FLAGS", "")
  # Both processes get the same environment (with the suite's XLA flags,
  # tests/conftest.py).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
  for mode in ("first", "resume"):
    proc = subprocess.run([sys.executable, __file__, mode, str(workdir)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{mode}:\n{proc.stderr[-6000:]}"
  load = lambda name: dict(np.load(workdir / name))
  return load("uninterrupted.npz"), load("resumed.npz")


def test_resumed_run_is_bit_identical(runs):
  straight, resumed = runs
  assert straight.keys() == resumed.keys()
  assert len(straight["losses"]) == RESUMED
  for name in straight:
    a, b = straight[name], resumed[name]
    assert a.dtype == b.dtype and a.shape == b.shape, name
    # Bitwise, NaN-safe: compare the bytes.
    assert a.tobytes() == b.tobytes(), (name, a, b)


def test_the_resumed_steps_refit_and_train(runs):
  straight, _ = runs
  # Refits at 0, 1, 2, 4 and every 8 steps up to step 70: 4 + 8 = 12.
  assert int(straight["refits"]) == 12 and int(straight["skipped"]) == 0
  assert np.all(np.isfinite(straight["losses"]))
  assert straight["losses"][-10:].mean() < straight["losses"][:10].mean()


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
