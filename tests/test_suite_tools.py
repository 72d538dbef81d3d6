"""The suite's own tools: per-file durations from a junit report, and longest-first order."""

import json
import types

from tests import conftest
from tests.record_durations import file_seconds


def test_file_seconds_sums_each_file_from_a_junit_report(tmp_path):
  report = tmp_path / "r.xml"
  report.write_text(
      '<testsuites><testsuite name="pytest">'
      '<testcase classname="tests.test_a" name="test_one" time="1.5"/>'
      '<testcase classname="tests.test_a" name="test_two" time="2.0"/>'
      '<testcase classname="tests.test_b.TestGroup" name="test_x" time="10.25"/>'
      '</testsuite></testsuites>')
  assert file_seconds(str(report)) == {"tests/test_b.py": 10.2, "tests/test_a.py": 3.5}


def _item(nodeid):
  return types.SimpleNamespace(nodeid=nodeid)


def test_files_run_longest_first_and_keep_their_own_order(tmp_path, monkeypatch):
  durations = tmp_path / "durations.json"
  durations.write_text(json.dumps({"tests/test_a.py": 5.0, "tests/test_b.py": 50.0,
                                   "tests/test_c.py": 1.0}))
  monkeypatch.setattr(conftest, "DURATIONS_FILE", str(durations))
  items = [_item(n) for n in ("tests/test_a.py::t1", "tests/test_c.py::t1", "tests/test_a.py::t2",
                              "tests/test_new.py::t1", "tests/test_b.py::t2", "tests/test_b.py::t1")]
  conftest.pytest_collection_modifyitems(None, None, items)
  # b (50 s), then a and the unrecorded file (the median, 5 s: collection order), then c.
  assert [i.nodeid for i in items] == [
      "tests/test_b.py::t2", "tests/test_b.py::t1", "tests/test_a.py::t1", "tests/test_a.py::t2",
      "tests/test_new.py::t1", "tests/test_c.py::t1"]
