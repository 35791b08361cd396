r"""Named settings of :func:`~llqr_optax.llqr`, to unpack into it.

``llqr(loss=..., **llqr_optax.PAPER)`` is the authors' configuration;
any entry can be overridden, e.g. ``llqr(loss=..., **{**PAPER, "refit_every": 100})``.
"""

from __future__ import annotations

import types

#: The authors' configuration, to unpack into :func:`~llqr_optax.llqr`.
#:
#: That of their experiments (SimonDufLab/LLQR, the CIFAR and ImageNet
#: presets of ``configs/experiment/`` run with ``divergence=ngd``,
#: ``ema_decay=0.95``):
#:
#: - the Fisher geometry (``"ngd"``) and a diagonal ``U``;
#: - a refit every 1000 steps from step 0 (``warmup=False``), each one 50
#:   momentum-SGD steps on ``J`` (learning rate 1e-3, momentum 0.9, each
#:   leaf's gradient clipped to norm 5) warm-started from the current ``U``,
#:   on one gradient sample (the whole refit batch: ``num_chunks=1``);
#: - the fitted diagonal averaged into the current one with ``ema=0.95``
#:   (the identity before the first refit), then floored at 1e-8;
#: - no damping;
#: - no loss guard (``guard=None``: the authors keep every fit; a floored
#:   diagonal always passes llqr's acceptance check before another
#:   transform, ``−U g`` descends).
#:
#: The authors refit on a fresh batch of 128 examples, not the training
#: batch: pass it as ``refit_apply_fn``/``refit_targets`` to ``update`` (the
#: training batch is used otherwise). They chain weight decay after ``U``:
#: ``optax.chain(llqr(...), optax.add_decayed_weights(5e-4),
#: optax.sgd(lr, momentum=0.9))``. Pass ``refit_every=1000, warmup=False`` to
#: :func:`~llqr_optax.compile_step` as well. Under
#: ``optax.inject_hyperparams`` the integers ``refit_every``, ``num_chunks``
#: and ``inner_steps`` go in ``static_args``.
#:
#: Example:
#:   >>> import jax.numpy as jnp, optax, llqr_optax
#:   >>> tx = optax.chain(
#:   ...     llqr_optax.llqr(loss="softmax_cross_entropy", **llqr_optax.PAPER),
#:   ...     optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
#:   >>> sorted(llqr_optax.PAPER)[:4]
#:   ['damping', 'ema', 'floor', 'geometry']
PAPER = types.MappingProxyType(dict(
    geometry="fisher", structure="diagonal", damping=0.0, refit_every=1000,
    num_chunks=1, inner_steps=50, inner_solver="sgd", ema=0.95, floor=1e-8,
    warmup=False, guard=None))
