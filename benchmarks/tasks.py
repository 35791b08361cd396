"""Training tasks for the optimizer benchmark: real data, offline, Flax linen.

Four tasks, each a :class:`Task` bundling the model, its data, a
deterministic batch order per seed and a held-out evaluation:

- ``mnist1d_mlp``: the demo's 40-100-100-10 relu MLP on MNIST-1D.
- ``mnist1d_autoencoder``: a deep tanh autoencoder of the MNIST-1D signals
  (40-100-50-25-8-25-50-100-40, squared error): the classic benchmark of
  Hessian-free and K-FAC, where curvature is badly conditioned.
- ``mnist1d_resnet``: a small 1-D convolutional ResNet (pre-activation
  residual blocks with LayerNorm, global average pooling) on MNIST-1D.
- ``char_transformer``: a small causal character-level Transformer language
  model on the Python documentation that ships with CPython
  (``pydoc_data.topics``); the last 10% of the text is held out.

The models are those of :mod:`benchmarks.models` (``flax.linen`` modules
whose parameters are a plain pytree, so every optimizer, ``llqr`` included,
sees the same ``params``). This module deliberately uses nothing beyond
``flax.linen``, ``jax``, ``optax`` and ``numpy`` so that it imports on older
pinned stacks as well (e.g. jax 0.8.2 / flax 0.10.7, where ``flax.nnx`` does
not import).

``quick=True`` shrinks every task (small models, few steps, small evaluation
sets) for the tests.

Example::

  task = get_task("mnist1d_mlp")
  params = task.init(jax.random.PRNGKey(0))
  xs, ys = task.batches(seed=0, steps=10)   # (10, B, ...) numpy arrays
  loss = task.loss_fn(params, xs[0], ys[0])
  val_loss, val_acc = task.evaluate(params)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from benchmarks import datasets
from benchmarks.common import cross_entropy
from benchmarks.models import MLP, CharTransformer, ResNet1D

Params = Any
Array = Any

TASK_NAMES = ("mnist1d_mlp", "mnist1d_autoencoder", "mnist1d_resnet",
              "char_transformer")

# Learning-rate families: every optimizer is tuned on its family's base rate
# times the same multipliers (``training/run.py --lr-mults``, default 1/3, 1, 3).
FAMILIES = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class Task:
  """A supervised training task with a deterministic data order.

  Attributes:
    name: the task's name (one of :data:`TASK_NAMES`).
    description: model and data in words, for the results.
    model: the ``flax.linen`` module.
    init: ``key -> params`` (a plain pytree, ``{"params": ...}``).
    apply: ``(params, x) -> outputs``: logits (for the language model
      ``(B, T, V)``), or the reconstruction for the autoencoder.
    batches: ``(seed, steps) -> (xs, ys)`` numpy arrays with a leading step
      axis, the same for every optimizer given the seed.
    evaluate: ``(params, split="val") -> (loss, accuracy)`` on the held-out
      split (``"val"``) or a fixed subset of the training data (``"train"``);
      ``accuracy`` is ``None`` for the autoencoder.
    batch_size: examples (sequences for the language model) per step.
    steps: the default number of training steps.
    target_loss: a smoothed training-loss target that Adam, at its best rate
      in the default run, reaches (the "steps and seconds to target" metric).
    base_lrs: each learning-rate family's base rate on this task.
    num_params: the number of parameters.
    info: extra facts (data sizes, corpus hash, …) for the results.
    loss: the training loss as an llqr loss name (``"softmax_cross_entropy"``
      with integer labels, or ``"squared_error"``).
  """

  name: str
  description: str
  model: nn.Module
  init: Callable[[Array], Params]
  apply: Callable[[Params, Array], Array]
  batches: Callable[[int, int], Tuple[np.ndarray, np.ndarray]]
  evaluate: Callable[..., Tuple[float, float]]
  batch_size: int
  steps: int
  target_loss: float
  base_lrs: Mapping[str, float]
  num_params: int
  info: Mapping[str, Any]
  loss: str = "softmax_cross_entropy"

  def loss_fn(self, params: Params, x: Array, y: Array) -> Array:
    """The training loss of a batch (a mean over examples and tokens)."""
    return LOSSES[self.loss](self.apply(params, x), y)


def squared_error(outputs: Array, targets: Array) -> Array:
  """Half squared error averaged over all elements (llqr's ``"squared_error"``)."""
  return 0.5 * jnp.mean(jnp.square(outputs - targets))


#: The tasks' losses by llqr loss name: what llqr is told the loss is.
LOSSES = {"softmax_cross_entropy": cross_entropy, "squared_error": squared_error}


def count_params(params: Params) -> int:
  return int(sum(np.prod(np.shape(v)) for v in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------
# Data orders and evaluation.


def epoch_batches(num_train: int, batch: int, steps: int, seed: int) -> np.ndarray:
  """Shuffled epochs of full batches, concatenated: ``(steps, batch)`` indices."""
  rng = np.random.default_rng([seed, 1])
  per_epoch = num_train // batch
  epochs = -(-steps // per_epoch)
  idx = [rng.permutation(num_train)[:per_epoch * batch].reshape(per_epoch, batch)
         for _ in range(epochs)]
  return np.concatenate(idx)[:steps]


def _evaluator(apply: Callable, splits: Dict[str, Tuple[np.ndarray, np.ndarray]],
               chunk: int, loss: str = "softmax_cross_entropy"):
  """``evaluate(params, split)``: mean loss and accuracy, in fixed-size chunks.

  For ``loss="squared_error"`` the loss is the mean half squared error per
  element and the accuracy ``None``.
  """
  classify = loss == "softmax_cross_entropy"

  @jax.jit
  def sums(params, x, y):
    out = apply(params, x)
    if not classify:
      return 0.5 * jnp.sum(jnp.square(out - y)), jnp.zeros(())
    per = optax.softmax_cross_entropy_with_integer_labels(out, y)
    return per.sum(), (jnp.argmax(out, -1) == y).sum()

  def evaluate(params, split: str = "val") -> Tuple[float, Optional[float]]:
    x, y = splits[split]
    n = x.shape[0]
    total = correct = 0.0
    for i in range(0, n - n % chunk, chunk):  # full chunks only: one shape
      l, c = sums(params, x[i:i + chunk], y[i:i + chunk])
      total, correct = total + float(l), correct + float(c)
    count = (n - n % chunk) * int(np.prod(y.shape[1:]))
    return total / count, (correct / count if classify else None)

  return evaluate


def _make(name, description, model, sample_x, batches, splits, eval_chunk,
          batch_size, steps, target_loss, base_lrs, info,
          loss: str = "softmax_cross_entropy") -> Task:
  init = lambda key: model.init(key, sample_x)
  apply = lambda params, x: model.apply(params, x)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  return Task(name=name, description=description, model=model, init=init,
              apply=apply, batches=batches,
              evaluate=_evaluator(apply, splits, eval_chunk, loss),
              batch_size=batch_size, steps=steps, target_loss=target_loss,
              base_lrs=dict(base_lrs), num_params=count_params(shapes),
              info=dict(info), loss=loss)


# --------------------------------------------------------------------------
# The tasks.


def _mnist1d_arrays(quick: bool):
  data = datasets.mnist1d(1000 if quick else 5000)
  return data["x_train"], data["y_train"], data["x_test"], data["y_test"]


def _mnist1d_task(name, description, model, quick, steps, target_loss, base_lrs,
                  autoencoder: bool = False, batch: Optional[int] = None):
  x_tr, y_tr, x_val, y_val = _mnist1d_arrays(quick)
  if autoencoder:  # the signal is its own target
    y_tr, y_val = x_tr, x_val
  batch = batch or (32 if quick else 128)

  def batches(seed: int, steps: int):
    idx = epoch_batches(x_tr.shape[0], batch, steps, seed)
    return x_tr[idx], y_tr[idx]

  splits = {"val": (x_val, y_val), "train": (x_tr, y_tr)}
  info = dict(dataset="MNIST-1D (mnist1d package, generated offline), "
                      "test split held out as validation",
              train_examples=int(x_tr.shape[0]), val_examples=int(x_val.shape[0]))
  return _make(name, description, model, x_tr[:1], batches, splits,
               eval_chunk=200 if quick else 1000, batch_size=batch, steps=steps,
               target_loss=target_loss, base_lrs=base_lrs, info=info,
               loss="squared_error" if autoencoder else "softmax_cross_entropy")


def mnist1d_mlp(quick: bool = False, batch: Optional[int] = None) -> Task:
  """The demo's MLP (40-100-100-10, relu) on MNIST-1D, batch 128."""
  widths = (32,) if quick else (100, 100)
  return _mnist1d_task(
      "mnist1d_mlp",
      "MLP 40-" + "-".join(map(str, widths)) + "-10 (relu) on MNIST-1D",
      MLP(widths), quick, steps=40 if quick else 1500,
      target_loss=1.0 if quick else 0.35,
      base_lrs={"adam": 1e-2, "sgd": 3e-2}, batch=batch)


def mnist1d_autoencoder(quick: bool = False, batch: Optional[int] = None) -> Task:
  """A deep tanh autoencoder of MNIST-1D's signals, squared error, batch 128.

  40-100-50-25-8-25-50-100-40 (tanh, linear output): the shape of the classic
  deep-autoencoder benchmark of Hessian-free optimisation and K-FAC, scaled
  to MNIST-1D's 40 standardised inputs. The loss is half the mean squared
  reconstruction error per element (0.5 for the zero reconstruction).
  """
  widths = (16, 4, 16) if quick else (100, 50, 25, 8, 25, 50, 100)
  model = MLP(widths, classes=40, activation="tanh")
  return _mnist1d_task(
      "mnist1d_autoencoder",
      "deep autoencoder 40-" + "-".join(map(str, widths)) + "-40 (tanh) of "
      "MNIST-1D's signals, squared error",
      model, quick, steps=40 if quick else 1500,
      target_loss=0.45 if quick else 0.14,
      base_lrs={"adam": 3e-3, "sgd": 3e-2}, autoencoder=True, batch=batch)


def mnist1d_resnet(quick: bool = False, batch: Optional[int] = None) -> Task:
  """A 1-D conv ResNet on MNIST-1D: stem conv, residual blocks with
  LayerNorm, global mean pooling, dense head; batch 128."""
  channels, blocks = (8, 1) if quick else (16, 2)
  return _mnist1d_task(
      "mnist1d_resnet",
      f"1-D conv ResNet on MNIST-1D: stem conv k5 1->{channels}, {blocks} "
      f"pre-activation residual blocks (LayerNorm, relu, conv k3 without bias; "
      f"twice), LayerNorm, "
      f"global mean pool, dense {channels}->10",
      ResNet1D(channels, blocks), quick, steps=40 if quick else 500,
      target_loss=1.5 if quick else 0.5,
      base_lrs={"adam": 1e-2, "sgd": 3e-2}, batch=batch)


@functools.lru_cache(maxsize=1)
def python_docs_corpus() -> Tuple[str, str]:
  """The Python documentation topics shipped with CPython, in sorted-key order.

  Returns the text and its sha256 (the corpus differs between Python versions).
  """
  from pydoc_data.topics import topics  # part of the standard library
  text = "\n\n".join(topics[k] for k in sorted(topics))
  return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def char_transformer(quick: bool = False, batch: Optional[int] = None) -> Task:
  """A small causal character-level Transformer LM on the Python docs.

  Characters are mapped to ids by sorted vocabulary; the first 90% of the
  text trains, the last 10% is held out. A training batch is ``batch_size``
  windows of ``context + 1`` characters at uniformly random offsets (seeded);
  validation uses non-overlapping windows of the held-out text.
  """
  text, sha = python_docs_corpus()
  vocab = sorted(set(text))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
  split = int(0.9 * len(ids))
  train, val = ids[:split], ids[split:]
  if quick:
    context, d_model, heads, layers, batch = 16, 16, 2, 1, 8
  else:
    context, d_model, heads, layers, batch = 32, 32, 4, 2, batch or 32
  model = CharTransformer(len(vocab), context, d_model, heads, layers)

  def windows(data: np.ndarray, starts: np.ndarray):
    w = data[starts[..., None] + np.arange(context + 1)]
    return w[..., :-1], w[..., 1:]

  def batches(seed: int, steps: int):
    rng = np.random.default_rng([seed, 2])
    starts = rng.integers(0, train.shape[0] - context - 1, size=(steps, batch))
    return windows(train, starts)

  num_eval = 64 if quick else 512
  val_starts = np.arange(0, val.shape[0] - context - 1, context + 1)[:num_eval]
  train_starts = np.random.default_rng(12345).integers(
      0, train.shape[0] - context - 1, size=num_eval)
  splits = {"val": windows(val, val_starts), "train": windows(train, train_starts)}
  info = dict(dataset="pydoc_data.topics (the Python documentation shipped with "
                      f"CPython {sys.version.split()[0]}), topics in sorted order, "
                      "last 10% held out",
              corpus_chars=len(text), corpus_sha256=sha, vocab=len(vocab),
              train_chars=int(train.shape[0]), val_chars=int(val.shape[0]),
              val_windows=int(val_starts.shape[0]), context=context)
  return _make(
      "char_transformer",
      f"causal char Transformer LM: {layers} pre-LN layers, d_model {d_model}, "
      f"{heads} heads, MLP 4x GELU, context {context}, learned positions, "
      f"vocab {len(vocab)}; batch {batch} windows",
      model, np.zeros((1, context), np.int32), batches, splits,
      eval_chunk=64, batch_size=batch, steps=40 if quick else 500,
      target_loss=3.2 if quick else 2.2,
      base_lrs={"adam": 1e-2, "sgd": 0.3}, info=info)


_BUILDERS: Dict[str, Callable[..., Task]] = {
    "mnist1d_mlp": mnist1d_mlp,
    "mnist1d_autoencoder": mnist1d_autoencoder,
    "mnist1d_resnet": mnist1d_resnet,
    "char_transformer": char_transformer,
}


def get_task(name: str, quick: bool = False, batch: Optional[int] = None) -> Task:
  """The task called ``name`` (one of :data:`TASK_NAMES`); ``batch`` overrides
  its batch size (examples, or windows for the language model)."""
  if name not in _BUILDERS:
    raise ValueError(f"unknown task {name!r}; choose from {list(_BUILDERS)}")
  return _BUILDERS[name](quick, batch=batch)


if __name__ == "__main__":  # a quick look at every task: python -m benchmarks.tasks
  for n in TASK_NAMES:
    t = get_task(n, quick="--quick" in sys.argv)
    p = t.init(jax.random.PRNGKey(0))
    xs, ys = t.batches(0, 2)
    print(f"{n}: {t.num_params} params; {t.description}; batch x {xs.shape[1:]} "
          f"y {ys.shape[1:]}; loss at init {float(t.loss_fn(p, xs[0], ys[0])):.3f}; "
          f"val {t.evaluate(p)}")
