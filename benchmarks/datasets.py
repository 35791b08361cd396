"""Small datasets available offline, for tests and benchmarks.

Everything here is generated locally: nothing touches the network.
"""

from __future__ import annotations

import functools
from typing import Dict

import numpy as np


@functools.lru_cache(maxsize=8)
def _mnist1d(num_samples: int, seed: int) -> Dict[str, np.ndarray]:
  # Imported lazily: only the callers that need MNIST-1D need the package.
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()  # an ObjectView; make_dataset needs attributes
  args.num_samples = int(num_samples)
  args.seed = int(seed)
  # make_dataset seeds NumPy's *global* generator; leave the caller's as it was.
  saved = np.random.get_state()
  try:
    data = make_dataset(args)  # generates in memory, never downloads
  finally:
    np.random.set_state(saved)

  x_train = np.asarray(data["x"], np.float32)
  x_test = np.asarray(data["x_test"], np.float32)
  # Standardise each of the 40 inputs with training statistics only.
  mean = x_train.mean(axis=0, keepdims=True)
  std = x_train.std(axis=0, keepdims=True) + 1e-6
  out = {
      "x_train": (x_train - mean) / std,
      "y_train": np.asarray(data["y"], np.int32),
      "x_test": (x_test - mean) / std,
      "y_test": np.asarray(data["y_test"], np.int32),
  }
  for v in out.values():
    v.setflags(write=False)  # shared by the cache: keep it immutable
  return out


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Dict[str, np.ndarray]:
  """MNIST-1D (Greydanus, 2020), generated offline with the ``mnist1d`` package.

  Ten classes of 1-D signals of length 40; 80% train, 20% test. Inputs are
  standardised per position with the training set's mean and std. The result
  is cached in-process; its arrays are read-only (copy before mutating).

  Args:
    num_samples: examples in total (train + test).
    seed: the generator's seed (42 is the package's default dataset).

  Returns:
    A dict with ``x_train`` (float32, ``(0.8·n, 40)``), ``y_train`` (int32),
    ``x_test`` (float32, ``(0.2·n, 40)``) and ``y_test`` (int32).
  """
  return dict(_mnist1d(int(num_samples), int(seed)))
