"""benchmarks/timing.py: interleaving, warm-up, per-pair ratio statistics, verdicts, formatting.

The statistics are checked exactly with a fake clock that each side advances by a scripted
amount (no wall-clock asserts); one test times real work of known relative cost (3x) and
only asks the ratio to land in a loose interval.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from benchmarks import timing

MACHINE = dict(load=(0.5, 0.25, 0.125), cores=2, commit="abc1234", date="2026-12-06 19:00 UTC")


class FakeClock:
  """Seconds that only move when a side says so."""

  def __init__(self):
    self.now = 0.0
    self.calls = []

  def __call__(self) -> float:
    return self.now

  def side(self, name: str, durations):
    """A side whose successive calls take ``durations`` seconds (and log their order)."""
    it = iter(durations)

    def fn():
      self.calls.append(name)
      self.now += next(it)
      return name
    return fn


def _compare(a, b, **kw):
  clock = FakeClock()
  r = timing.compare({"ours": clock.side("ours", a), "diffusers": clock.side("diffusers", b)},
                     clock=clock, machine_info=lambda: dict(MACHINE), **kw)
  return r, clock


def test_exact_median_and_iqr_from_a_fake_clock():
  # warm-up round (99 s vs 1 s) thrown away; kept ratios 1, 2, 3, 4, 5 (out of order).
  r, clock = _compare([99, 8, 2, 10, 4, 6], [1, 2, 2, 2, 2, 2], pairs=5, warmup=1)
  assert r.times["ours"] == (8, 2, 10, 4, 6)
  assert r.times["diffusers"] == (2, 2, 2, 2, 2)
  assert r.ratio().ratios == (4, 1, 5, 2, 3)
  assert r.median_ratio == 3.0
  assert r.iqr == (2.0, 4.0)
  assert r.verdict == "slower"
  assert r.median_s("ours") == 6.0
  # interleaved, and the side that opens a round alternates
  assert clock.calls == ["ours", "diffusers", "diffusers", "ours"] * 3
  assert r.outputs == {"ours": "ours", "diffusers": "diffusers"}


def test_verdicts_faster_slower_and_no_difference():
  same, _ = _compare([1.0] * 8, [1.0] * 8, pairs=7)  # two identical functions
  assert (same.median_ratio, same.iqr, same.verdict) == (1.0, (1.0, 1.0), "no difference")
  # IQR 0.95..1.05 crosses 1.0: no difference although the median is below 1
  near, _ = _compare([1, 0.8, 0.95, 0.9, 1.05, 1.1], [1] * 6, pairs=5)
  assert near.iqr == pytest.approx((0.9, 1.05)) and near.verdict == "no difference"
  fast, _ = _compare([1, 0.5, 0.6, 0.7], [1] * 4, pairs=3)
  assert fast.verdict == "faster" and fast.median_ratio == pytest.approx(0.6)


def test_three_sides_baseline_and_self_timed():
  clock = FakeClock()
  r = timing.compare({"a": lambda: 3.0, "b": lambda: 6.0, "c": lambda: 1.5}, pairs=3,
                     warmup=0, baseline="b", self_timed=True, clock=clock,
                     machine_info=lambda: dict(MACHINE))
  assert r.ratio("a").ratios == (0.5,) * 3 and r.ratio("c").median == 0.25
  assert r.median_ratio == 0.5  # first side over the baseline
  assert r.as_dict()["ratios"]["c"] == dict(over="b", median=0.25, iqr=[0.25, 0.25],
                                            verdict="faster", pairs=3)
  with pytest.raises(ValueError, match="at least two sides"):
    timing.compare({"a": lambda: None})
  with pytest.raises(ValueError, match="baseline"):
    timing.compare({"a": lambda: None, "b": lambda: None}, baseline="z")
  with pytest.raises(KeyError, match="no side"):
    r.ratio("z")


def test_jax_outputs_are_waited_for_inside_the_timed_region():
  clock = FakeClock()

  class Pending:  # a leaf whose block_until_ready takes 4 s, as a JAX array's might
    def block_until_ready(self):
      clock.now += 4.0
      return self

  r = timing.compare({"jax": lambda: {"x": Pending(), "y": jnp.ones(2)},
                      "other": clock.side("other", [2.0] * 3)}, pairs=2, clock=clock,
                     machine_info=lambda: dict(MACHINE))
  assert r.times["jax"] == (4.0, 4.0) and r.median_ratio == 2.0


def test_formatting():
  r, _ = _compare([99, 8, 2, 10, 4, 6], [1, 2, 2, 2, 2, 2], pairs=5, label="DiT tiny")
  text = r.format()
  assert "DiT tiny: ours 6 s | diffusers 2 s (median per call)" in text
  assert "ours / diffusers = 3.00 (IQR 2.00-4.00, 5 pairs): slower" in text
  assert "load 0.50/0.25/0.12 -> 0.50/0.25/0.12 on 2 cores, clock FakeClock, commit abc1234" in text
  row = r.format_row()
  assert row == ("| DiT tiny | 6 s | 2 s | 3.00 (2.00-4.00) | slower | 0.5/0.2/0.1 | 2 | "
                 "abc1234 | 2026-12-06 19:00 UTC |")
  header = timing.table_header("ours", "diffusers").splitlines()
  assert header[0].count("|") == header[1].count("|") == row.count("|")
  ms, _ = _compare([1, 0.0123] * 2, [1, 0.0246] * 2, pairs=1, warmup=1)
  assert "ours 12.3 ms | diffusers 24.6 ms" in ms.format()


def test_machine_reports_load_cores_commit_and_date():
  m = timing.machine()
  assert len(m["load"]) == 3 and m["cores"] >= 1
  assert re.fullmatch(r"[0-9a-f]{4,40}|unknown", m["commit"])
  assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", m["date"])


def _busy(n: int) -> int:
  total = 0
  for i in range(n):
    total += i * i % 7
  return total


def test_real_work_of_three_times_the_cost():
  # Timed by this thread's CPU clock: on a shared machine (load 15 on 2 cores seen here) a
  # wall-clock round that gets preempted moves the ratio by 10x; CPU time does not count
  # the preemption. Loose interval all the same. About 0.2 s in all.
  r = timing.compare({"3n": lambda: _busy(60_000), "n": lambda: _busy(20_000)}, pairs=9,
                     warmup=1, clock=time.thread_time)
  assert 1.8 < r.median_ratio < 5.0, r.format()
  assert r.verdict == "slower"


def test_busy_cores_counts_other_work_that_the_load_average_lags_on():
  """A process spinning on one core during the window shows as at least half a core busy."""
  spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<6: pass"])
  try:
    time.sleep(0.5)  # let it start spinning
    busy = timing.busy_cores(seconds=2.0)
  finally:
    spin.wait()
  assert busy is not None and busy >= 0.5, busy
