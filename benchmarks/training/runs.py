"""The training harness's runs: one optimizer at one rate on one seed.

:func:`run_group` trains the runs of one seed together, interleaved block by
block, timing every step; :func:`summarise_run` turns a run into its
JSON-ready metrics; :func:`add_ratios` sets the time ratios over Adam within
one group.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np

from benchmarks import tasks as tasks_lib
from benchmarks.common import smooth
from benchmarks.training.runner import OptState, Params, Runner

SMOOTH_BETA = 0.98
STOP_AFTER_NONFINITE = 10  # a run stops after this many non-finite losses


@dataclasses.dataclass
class Run:
  """One optimizer at one rate on one seed of one task, and what it measured."""

  task: str
  optimizer: str
  lr: float
  seed: int
  phase: str
  runner: Runner
  params: Params = None
  state: OptState = None
  losses: List[float] = dataclasses.field(default_factory=list)
  times: List[float] = dataclasses.field(default_factory=list)
  evals: List[Dict[str, float]] = dataclasses.field(default_factory=list)
  nonfinite: int = 0
  stopped_at: Optional[int] = None
  error: Optional[str] = None
  result: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def label(self) -> str:
    return f"{self.optimizer}@{self.lr:g}"


def first_at_or_below(curve: np.ndarray, target: float) -> Optional[int]:
  hits = np.nonzero(curve <= target)[0]
  return int(hits[0]) + 1 if hits.size else None


def eval_points(steps: int, count: int = 4) -> List[int]:
  return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def run_group(task: tasks_lib.Task, runs: List[Run], seed: int, steps: int,
              block: int, progress: Callable[[int], None]) -> None:
  """Trains ``runs`` (same seed) together, block by block, timing every step."""
  xs, ys = task.batches(seed, steps)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed + 1000), steps))
  params0 = task.init(jax.random.PRNGKey(seed))
  for r in runs:
    r.params = params0
    try:
      r.state = r.runner.init(params0, jax.random.PRNGKey(seed + 2000))
    except Exception as e:  # noqa: BLE001 - a peer that fails: record, go on
      r.error, r.stopped_at = f"init: {type(e).__name__}: {e}", 0
  checkpoints = eval_points(steps)
  for b, t0 in enumerate(range(0, steps, block)):
    t1 = min(steps, t0 + block)
    xb = jax.device_put(list(xs[t0:t1]))
    yb = jax.device_put(list(ys[t0:t1]))
    kb = jax.device_put(list(keys[t0:t1]))
    jax.block_until_ready((xb, yb, kb))
    order = runs[b % len(runs):] + runs[:b % len(runs)]
    for r in order:
      if r.stopped_at is not None:
        continue
      try:
        for i in range(t1 - t0):
          tic = time.perf_counter()
          params, state, loss = r.runner.step(r.params, r.state, xb[i], yb[i], kb[i])
          jax.block_until_ready((params, loss))
          r.times.append(time.perf_counter() - tic)
          r.params, r.state = params, state
          loss = float(loss)
          r.losses.append(loss)
          if not math.isfinite(loss):
            r.nonfinite += 1
            if r.nonfinite >= STOP_AFTER_NONFINITE:
              r.stopped_at = t0 + i + 1
              break
      except Exception as e:  # noqa: BLE001 - record, keep the others going
        r.error, r.stopped_at = f"step {len(r.losses)}: {type(e).__name__}: {e}", len(r.losses)
      if r.stopped_at is None and t1 in checkpoints:
        vl, va = task.evaluate(r.params, "val")
        r.evals.append(dict(step=t1, val_loss=vl, val_acc=va))
    progress(t1)


def summarise_run(task: tasks_lib.Task, r: Run, steps: int) -> Dict[str, Any]:
  """The run's metrics, JSON-ready (the curve every ``k`` steps)."""
  n = len(r.losses)
  losses = np.asarray(r.losses + [np.nan] * (steps - n))
  sm = smooth(losses, SMOOTH_BETA)
  times = np.asarray(r.times, float)
  later = times[1:] if times.size > 1 else times
  med = float(np.median(later)) if later.size else None
  clock = np.concatenate([[med if med is not None else 0.0], later]) if times.size else times
  clock = np.cumsum(np.concatenate([clock, np.full(steps - clock.size, np.nan)]))
  hit = first_at_or_below(sm, task.target_loss)
  if r.stopped_at is None and n == steps:
    train_loss, train_acc = task.evaluate(r.params, "train")
    val_loss, val_acc = (r.evals[-1]["val_loss"], r.evals[-1]["val_acc"])
  else:
    train_loss = train_acc = val_loss = val_acc = None
  k = max(1, steps // 250)
  at = np.arange(k, steps + 1, k)
  out = dict(
      task=r.task, optimizer=r.optimizer, lr=r.lr, seed=r.seed, phase=r.phase,
      steps_done=n, stopped_at=r.stopped_at, error=r.error,
      nan_count=int(np.sum(~np.isfinite(np.asarray(r.losses)))) if n else 0,
      final_train_loss=train_loss, final_train_acc=train_acc,
      final_val_loss=val_loss, final_val_acc=val_acc,
      final_smoothed_loss=_num(sm[-1]), first_loss=_num(losses[0]),
      steps_to_target=hit, seconds_to_target=_num(clock[hit - 1]) if hit else None,
      ms_per_step_median=None if med is None else 1e3 * med,
      ms_per_step_mean=float(1e3 * np.mean(later)) if later.size else None,
      first_step_seconds=float(times[0]) if times.size else None,
      total_step_seconds=float(np.sum(times)),
      evals=r.evals,
      curve=dict(step=at.tolist(), smoothed=[_num(v) for v in sm[at - 1]],
                 raw=[_num(np.mean(losses[a - k:a])) for a in at],
                 seconds=[_num(v) for v in clock[at - 1]]))
  out.update(_llqr_info(r.state))
  return out


def _num(v) -> Optional[float]:
  v = float(v)
  return v if math.isfinite(v) else None


def _llqr_info(state) -> Dict[str, Any]:
  if "llqr_optax" not in sys.modules or state is None:
    return {}
  try:
    s = sys.modules["llqr_optax"].find_state(state)
  except ValueError:  # no llqr in this optimizer
    return {}
  return dict(refits=int(s.refits), skipped_refits=int(s.skipped_refits),
              skipped_updates=int(s.skipped_updates), damping=float(s.damping),
              rejected_refits=int(s.rejected_refits), guard_trips=int(s.guard_trips))


def add_ratios(results: List[Dict[str, Any]], reference: str = "adam") -> None:
  """Per-step time over the reference's, within one interleaved group."""
  ref = [r for r in results if r["optimizer"] == reference and r["ms_per_step_median"]]
  for r in results:
    r["ratio_vs_adam_median"] = r["ratio_vs_adam_mean"] = None
    if ref and r["ms_per_step_median"]:
      base = ref[0] if len(ref) == 1 else min(ref, key=lambda a: abs(math.log(a["lr"] / r["lr"])))
      r["ratio_vs_adam_median"] = r["ms_per_step_median"] / base["ms_per_step_median"]
      r["ratio_vs_adam_mean"] = r["ms_per_step_mean"] / base["ms_per_step_mean"]
