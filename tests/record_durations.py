"""Writes tests/durations.json (seconds per test file) from a ``pytest --junitxml`` report.

  python -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests --junitxml=/tmp/suite.xml
  python -m tests.record_durations /tmp/suite.xml

The suite's scheduler (tests/conftest.py) starts the longest files first.
"""

from __future__ import annotations

import collections
import json
import sys
import xml.etree.ElementTree as ET

from tests.conftest import DURATIONS_FILE


def file_seconds(report: str) -> dict[str, float]:
  """'tests/test_x.py' -> summed test time (fixtures included) from a junit XML report."""
  total: dict[str, float] = collections.defaultdict(float)
  for case in ET.parse(report).getroot().iter("testcase"):
    # classname is the dotted module path, e.g. "tests.test_x" (or "tests.test_x.TestClass").
    parts = case.get("classname", "").split(".")
    while parts and not parts[-1].startswith("test_"):
      parts.pop()
    if parts:
      total["/".join(parts) + ".py"] += float(case.get("time", 0.0))
  return {k: round(v, 1) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__)
    return 2
  seconds = file_seconds(argv[1])
  with open(DURATIONS_FILE, "w") as f:
    json.dump(seconds, f, indent=1)
    f.write("\n")
  print(f"{DURATIONS_FILE}: {len(seconds)} files, {sum(seconds.values()) / 60:.1f} min in all")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
