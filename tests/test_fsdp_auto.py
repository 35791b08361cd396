"""FSDP on a mesh with auto axes (``AxisType.Auto``): the same run as
``test_fsdp.py``'s on explicit axes, in its own subprocess.

The results equal the one-device run within ``AUTO_TOL`` and the
state stays split (``out_shardings``). The communication is XLA's sharding
propagation's choice on auto axes (it may gather a factor), so it is checked
on explicit axes only, in ``test_fsdp.py``.
"""

import pytest

from test_fsdp import AUTO_TOL, assert_matches, assert_stays_split, run_worker


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return run_worker(tmp_path_factory.mktemp("fsdp_auto") / "results.json", "auto")


def test_fsdp_on_auto_axes_matches_one_device(results):
  assert results["refits"] == 3
  assert_matches(results["auto"], AUTO_TOL)


def test_state_stays_split_on_auto_axes(results):
  assert_stays_split(results["auto"]["final_specs"])
