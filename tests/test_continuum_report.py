"""``benchmarks.results.continuum``: the continuum's table from the harness's
summaries (steps to target, the ratio to Adam's, time to target)."""

import json

from benchmarks.results import continuum


def _summary(name, steps, lr=0.01, time_per_step=1.0):
  return dict(optimizer=name, best_lr=lr, lr_at_edge=False, steps_to_target=steps,
              ratio_vs_adam_mean={"median": time_per_step})


def test_report_tables_ratios_and_fastest_row(tmp_path):
  rows = [_summary("adam", [100, 110, 90]),
          _summary(continuum.exact_row(5), [50, 60, 40], time_per_step=4.0),
          _summary(continuum.llqr_row(0), [80, 90, 85], time_per_step=1.1),
          _summary(continuum.llqr_row(20), [30, None, 35], time_per_step=9.0)]
  (tmp_path / "training_continuum_mnist1d_mlp.json").write_text(
      json.dumps({"summary": rows}))
  continuum.report(tmp_path)
  text = (tmp_path / "continuum.md").read_text()
  assert "Adam: 100 steps [90–110]" in text
  # exact, k = 5: 50 steps, 0.50x Adam's, time 0.5 * 4.0 = 2.0x
  assert "| 5 | 50 [40–60], 0.50× · 2.0× | – |" in text
  # llqr, k = 0: 85 steps, 0.85x, time 0.85 * 1.1 = 0.9x; fastest in time
  assert "| 0 | (Adam) | 85 [80–90], 0.85× · 0.9× |" in text
  assert "| 20 | – | 2/3 reach it |" in text
  assert "Fastest to the target in time: `llqr[damping=0.1]+adam`." in text
  assert (tmp_path / "continuum.png").stat().st_size > 0


def test_kept_section_links_the_kept_plot():
  lines = continuum.section()
  assert lines[0].startswith("## The continuum")
  assert lines[-2] == "![continuum](results/continuum/continuum.png)"
  assert (continuum.KEPT / "continuum.png").exists()
