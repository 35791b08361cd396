"""benchmarks/training/peers.py in the main environment, where the peers cannot run.

K-FAC and PSGD Kron run only in the pinned peer environment (``make
bench-peers``; CI has none). Here the module must still import, offer no
peer whose package is missing, and say why, so that the training harness
skips them with a note instead of failing.
"""

import importlib.util

import pytest

from benchmarks.training import peers

PACKAGES = {"kfac": "kfac_jax", "kfac_adaptive": "kfac_jax",
            "psgd_kron": "psgd_jax"}


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_peer_offered_only_with_its_package(name):
  installed = importlib.util.find_spec(PACKAGES[name]) is not None
  if not installed:
    assert name not in peers.PEERS
    assert "peer environment" in peers.UNAVAILABLE[name]
  assert (name in peers.PEERS) != (name in peers.UNAVAILABLE)
  assert peers.LR_FAMILY[name] == "adam"


def test_registered_loss_matches_the_tasks_mean():
  """The loss K-FAC registers is the tasks' mean cross-entropy."""
  import jax
  import jax.numpy as jnp

  from benchmarks import tasks

  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7))
  labels = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, 7)
  assert jnp.allclose(peers.mean_cross_entropy(logits, labels),
                      tasks.cross_entropy(logits, labels))


@pytest.mark.skipif(importlib.util.find_spec("kfac_jax") is not None,
                    reason="kfac-jax is installed: the peer is offered")
def test_harness_skips_missing_peers(tmp_path):
  from benchmarks.training import run as training

  data = training.main(["--quick", "--tasks", "mnist1d_mlp", "--steps", "3",
                        "--seeds", "0", "--lr-mults", "1", "--optimizers",
                        "adam", "kfac", "--out", str(tmp_path)])
  assert "kfac" in data["meta"]["skipped"]
  assert [r["optimizer"] for r in data["summary"]] == ["adam"]
