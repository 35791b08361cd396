"""The results the repository keeps: ``benchmarks/results/data`` holds summaries
(:mod:`benchmarks.results.slim`), and ``RESULTS.md`` is rendered from them.

No JAX: the summaries are plain JSON, the renderer plain Python and matplotlib.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from benchmarks.cli import ROOT
from benchmarks.results import render, slim

KEPT = ROOT / "benchmarks" / "results"


def _full():
  """A training JSON as the harness writes it: two runs with their curves."""
  run = dict(task="t", optimizer="adam", lr=0.01, seed=0, phase="grid",
             final_train_loss=0.125, steps_to_target=None, ms_per_step_median=1.5,
             evals=[dict(step=10, val_loss=0.5)],
             curve=dict(step=[1, 2], raw=[2.0, 1.0], smoothed=[2.0, 1.5]))
  other = dict(run, optimizer="llqr+adam", final_train_loss=math.nan, steps_to_target=7,
               refits=3)
  return dict(meta=dict(seeds=[0], command="python -m benchmarks.training"),
              tasks=[dict(name="t", steps=2)],
              summary=[dict(optimizer="adam", best_lr=0.01)],
              runs=[run, other])


def test_slim_drops_the_curves_and_keeps_every_number():
  full = _full()
  kept = json.loads(slim.dumps(slim.slim(full)))
  assert {k: kept[k] for k in ("meta", "tasks", "summary")} == {
      k: full[k] for k in ("meta", "tasks", "summary")}
  table = kept["runs"]
  assert not set(slim.CURVES) & set(table["columns"])
  rows = [dict(zip(table["columns"], r)) for r in table["rows"]]
  assert rows[0]["final_train_loss"] == 0.125 and rows[0]["refits"] is None
  assert rows[1]["steps_to_target"] == 7 and rows[1]["refits"] == 3
  assert math.isnan(rows[1]["final_train_loss"])
  assert slim.slim(kept) is kept  # a summary is kept as it is


def test_slim_keep_writes_a_summary(tmp_path):
  src = tmp_path / "training_x.json"
  src.write_text(json.dumps(_full(), indent=2))
  dest = slim.keep(src, tmp_path / "data")
  assert dest == tmp_path / "data" / "training_x.json"
  assert slim.is_slim(json.loads(dest.read_text()))
  assert dest.stat().st_size < src.stat().st_size
  with pytest.raises(ValueError, match="path="):
    slim.keep(tmp_path / "notes.txt", tmp_path / "data")


def test_kept_data_are_summaries():
  for path in sorted((KEPT / "data").glob("*.json")):
    data = json.loads(path.read_text())
    assert slim.slim(data) == data, f"{path.name}: run benchmarks.results.slim on it"


def test_results_md_is_rendered_from_what_is_kept(tmp_path):
  """``python -m benchmarks.results --update`` on the kept summaries and plots
  writes the committed ``RESULTS.md`` again."""
  committed = (ROOT / "benchmarks" / "RESULTS.md").read_text()
  md = tmp_path / "RESULTS.md"
  md.write_text(committed)
  assets = tmp_path / "results"
  assets.mkdir()
  for png in KEPT.glob("*.png"):
    shutil.copyfile(png, assets / png.name)
  render.main(["--in", str(KEPT / "data"), "--md", str(md), "--update"])
  assert md.read_text() == committed
  for png in ("ablation_steps.png", "batch_steps.png"):  # drawn from the summaries
    assert (assets / png).stat().st_size > 0
