"""The long-horizon benchmark's tasks: train, validation and test splits.

The paper's regime (:mod:`benchmarks.horizon.run`) is judged on test
accuracy after a long schedule, with each optimizer's rate picked on a
validation split that the test never sees:

- ``resnet``: the 1-D conv ResNet of :class:`benchmarks.models.ResNet1D`
  (16 channels, 2 blocks) on MNIST-1D;
- ``cnn``: the plain 1-D CNN of :class:`benchmarks.models.CNN` (two
  convolutions of 32 channels, a dense head) on MNIST-1D;
- ``transformer``: the causal character Transformer of
  :class:`benchmarks.models.CharTransformer` (2 layers, d_model 32, context
  32, batch 32) on the Python documentation.

MNIST-1D (``mnist1d`` package, generated offline) with 6,000 examples: the
package's 4,800/1,200 split, the first 4,000 training examples train, the
other 800 validate, the 1,200 test examples test. With batch 128 an epoch is
31 steps. The text's last 10% is held out, its first half for validation and
its second for test (512 windows each).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import datasets
from benchmarks.models import CNN, CharTransformer, ResNet1D
from benchmarks.tasks import epoch_batches, python_docs_corpus

TASKS = ("resnet", "cnn", "transformer")
EVAL_CHUNK = 400


@dataclasses.dataclass(frozen=True)
class HorizonTask:
  """A classification task with train/validation/test splits.

  Attributes:
    name: one of :data:`TASKS`.
    description: model and data in words.
    init: ``key -> params``.
    apply: ``(params, x) -> logits``.
    batches: ``(seed, steps) -> (xs, ys)``, the training batches in order.
    splits: ``{"train": (x, y), "val": ..., "test": ...}``; ``train`` is a
      fixed subset of the training data (the loss the optimizer minimises).
    batch_size: examples (windows) per step.
    steps_per_epoch: training steps per pass over the training data.
    family: the base optimizer's family (``"sgd"`` or ``"adam"``).
  """

  name: str
  description: str
  init: Callable[[jax.Array], Any]
  apply: Callable[[Any, jax.Array], jax.Array]
  batches: Callable[[int, int], Tuple[np.ndarray, np.ndarray]]
  splits: Dict[str, Tuple[np.ndarray, np.ndarray]]
  batch_size: int
  steps_per_epoch: int
  family: str

  def loss(self, params, x, y):
    """Mean cross-entropy over examples (and positions)."""
    return optax.softmax_cross_entropy_with_integer_labels(self.apply(params, x), y).mean()


def _mnist1d_splits():
  data = datasets.mnist1d(6000)
  x, y = data["x_train"], data["y_train"]
  return (x[:4000], y[:4000]), (x[4000:], y[4000:]), (data["x_test"], data["y_test"])


def _conv_task(name: str, model, description: str) -> HorizonTask:
  (x_tr, y_tr), val, test = _mnist1d_splits()
  batch = 128

  def batches(seed: int, steps: int):
    idx = epoch_batches(x_tr.shape[0], batch, steps, seed)
    return x_tr[idx], y_tr[idx]

  subset = np.random.default_rng(0).choice(x_tr.shape[0], 1200, replace=False)
  return HorizonTask(
      name=name, description=description,
      init=lambda key: model.init(key, x_tr[:1]), apply=model.apply,
      batches=batches,
      splits={"train": (x_tr[subset], y_tr[subset]), "val": val, "test": test},
      batch_size=batch, steps_per_epoch=x_tr.shape[0] // batch, family="sgd")


def _transformer_task() -> HorizonTask:
  text, _ = python_docs_corpus()
  vocab = sorted(set(text))
  lookup = {c: i for i, c in enumerate(vocab)}
  ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
  split = int(0.9 * len(ids))
  train, held = ids[:split], ids[split:]
  val_text, test_text = held[:len(held) // 2], held[len(held) // 2:]
  context, batch = 32, 32
  model = CharTransformer(len(vocab), context, 32, 4, 2)

  def windows(data, starts):
    w = data[starts[..., None] + np.arange(context + 1)]
    return w[..., :-1], w[..., 1:]

  def batches(seed: int, steps: int):
    rng = np.random.default_rng([seed, 2])
    return windows(train, rng.integers(0, train.shape[0] - context - 1,
                                       size=(steps, batch)))

  def tiled(data, count):
    return windows(data, np.arange(0, data.shape[0] - context - 1, context + 1)[:count])

  train_starts = np.random.default_rng(12345).integers(
      0, train.shape[0] - context - 1, size=800)
  return HorizonTask(
      name="transformer",
      description=(f"causal char Transformer LM (2 pre-LN layers, d_model 32, 4 heads, "
                   f"context {context}, vocab {len(vocab)}) on the Python docs, "
                   f"batch {batch} windows"),
      init=lambda key: model.init(key, np.zeros((1, context), np.int32)),
      apply=model.apply, batches=batches,
      splits={"train": windows(train, train_starts), "val": tiled(val_text, 400),
              "test": tiled(test_text, 400)},
      batch_size=batch, steps_per_epoch=(train.shape[0] // (context + 1)) // batch,
      family="adam")


def get_task(name: str) -> HorizonTask:
  """The task called ``name`` (one of :data:`TASKS`)."""
  if name == "resnet":
    return _conv_task("resnet", ResNet1D(16, 2),
                      "1-D conv ResNet (stem k5 1->16, 2 pre-activation residual "
                      "blocks with LayerNorm, dense head) on MNIST-1D, batch 128")
  if name == "cnn":
    return _conv_task("cnn", CNN(), "1-D CNN (two convolutions k5, 32 channels, "
                      "dense head) on MNIST-1D, batch 128")
  if name == "transformer":
    return _transformer_task()
  raise ValueError(f"task={name!r} is unknown; choose one of {list(TASKS)}")


def evaluator(task: HorizonTask):
  """``evaluate(params) -> {split: (loss, accuracy)}`` on every split."""
  @jax.jit
  def sums(params, x, y):
    logits = task.apply(params, x)
    per = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return per.sum(), (jnp.argmax(logits, -1) == y).sum()

  def evaluate(params) -> Dict[str, Tuple[float, float]]:
    out = {}
    for split, (x, y) in task.splits.items():
      n = x.shape[0] - x.shape[0] % EVAL_CHUNK
      parts = [sums(params, x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK])
               for i in range(0, n, EVAL_CHUNK)]
      count = n * int(np.prod(y.shape[1:]))
      out[split] = (float(sum(p[0] for p in parts)) / count,
                    float(sum(p[1] for p in parts)) / count)
    return out

  return evaluate
