"""Side-by-side timing: two or more ways of doing the same work, interleaved in one process.

Every benchmark that reports "A / B" uses :func:`compare`, so a ratio always means the same
thing: the sides run in turn (A, B, A, B, ...; the side that starts each round rotates, so
neither always runs right after the other), the first ``warmup`` rounds are thrown away
(compilation, caches, lazy allocation), and each of the ``pairs`` kept rounds gives one ratio
``time(side) / time(baseline)``. Reported: the median of those per-round ratios and their
interquartile range (IQR, 25th..75th percentile). Because the two sides of a round run
seconds apart, a load change on a shared machine moves both; the IQR says how much it still
moved the ratio. A ratio whose IQR contains 1.0 is reported as "no difference".

The machine's state goes beside every result: load average (``os.getloadavg``, before and
after), the cores this process may use, the commit (``git rev-parse --short HEAD``) and the
UTC date, so a number in BENCHMARKS.md can be judged by the load it was measured under.

  from timing import compare            # a script in benchmarks/
  r = compare({"ours": lambda: f(x), "diffusers": lambda: g(x)}, pairs=9, warmup=2)
  print(r.format())                     # human-readable block
  print(r.format_row())                 # one markdown table row (header: ``table_header()``)
  r.median_ratio, r.iqr, r.verdict      # first side / baseline

JAX outputs are waited for (``jax.block_until_ready``) inside the timed region. A side whose
work must run elsewhere (its own process, a training loop that logs its own step time) is
compared with ``self_timed=True``: its callable returns the seconds it measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

NO_DIFFERENCE = "no difference"


def _wait(out: Any) -> Any:
  """Blocks until JAX arrays in ``out`` (any pytree) are computed; other values pass through.
  JAX is only consulted if the caller imported it (a torch-only side pays nothing)."""
  jax = sys.modules.get("jax")
  return jax.block_until_ready(out) if jax is not None else out


def busy_cores(seconds: float = 3.0) -> float | None:
  """How many cores' worth of CPU the whole machine used over the next ``seconds``
  (``/proc/stat``; None where there is none). Taken while this process sleeps, so it is the
  work of every other process: unlike the load average, it does not still count the
  benchmark that ended a minute ago."""
  def ticks():
    with open("/proc/stat", encoding="ascii") as f:
      v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait
  try:
    total0, idle0 = ticks()
    time.sleep(seconds)
    total1, idle1 = ticks()
  except OSError:
    return None
  if total1 == total0:
    return 0.0
  return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def machine() -> dict:
  """Where and when: load average (1, 5, 15 min), usable cores, commit, UTC date."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 0
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = "unknown"
  return dict(load=tuple(round(x, 2) for x in os.getloadavg()), cores=cores, commit=commit,
              date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
  """(25th, 50th, 75th) percentiles, linear interpolation (numpy's default)."""
  q = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
  return float(q[0]), float(q[1]), float(q[2])


@dataclasses.dataclass(frozen=True)
class Ratio:
  """One side against the baseline: per-round ratios and their median / IQR."""
  side: str
  baseline: str
  ratios: tuple[float, ...]

  @property
  def median(self) -> float:
    return _quartiles(self.ratios)[1]

  @property
  def iqr(self) -> tuple[float, float]:
    q1, _, q3 = _quartiles(self.ratios)
    return q1, q3

  @property
  def verdict(self) -> str:
    """"faster" / "slower" (``side`` against ``baseline``), or "no difference" when the
    IQR of the per-round ratios contains 1.0."""
    lo, hi = self.iqr
    if lo <= 1.0 <= hi:
      return NO_DIFFERENCE
    return "faster" if hi < 1.0 else "slower"

  def format(self) -> str:
    lo, hi = self.iqr
    return (f"{self.side} / {self.baseline} = {self.median:.2f} (IQR {lo:.2f}-{hi:.2f}, "
            f"{len(self.ratios)} pairs): {self.verdict}")


@dataclasses.dataclass(frozen=True)
class Comparison:
  """What :func:`compare` measured. ``times[name]``: seconds of each kept round (in order);
  ``outputs[name]``: the last value the side returned (for correctness checks);
  ``before`` / ``after``: :func:`machine` at the start and the end."""
  label: str
  names: tuple[str, ...]
  baseline: str
  times: Mapping[str, tuple[float, ...]]
  outputs: Mapping[str, Any]
  before: Mapping[str, Any]
  after: Mapping[str, Any]
  clock: str = "perf_counter"

  def ratio(self, side: str | None = None) -> Ratio:
    """``side`` (default: the first non-baseline side) over the baseline, round by round."""
    side = side or next(n for n in self.names if n != self.baseline)
    if side not in self.times:
      raise KeyError(f"no side {side!r}; sides: {', '.join(self.names)}")
    return Ratio(side, self.baseline, tuple(a / b for a, b in
                                            zip(self.times[side], self.times[self.baseline])))

  @property
  def median_ratio(self) -> float:
    return self.ratio().median

  @property
  def iqr(self) -> tuple[float, float]:
    return self.ratio().iqr

  @property
  def verdict(self) -> str:
    return self.ratio().verdict

  def median_s(self, side: str) -> float:
    return _quartiles(self.times[side])[1]

  def context(self) -> str:
    """"load 1.02/0.95/0.90 -> 1.10/0.97/0.91 on 2 cores, commit abc1234, 2026-12-06 19:00 UTC"."""
    fmt = lambda m: "/".join(f"{x:.2f}" for x in m["load"])
    clock = "" if self.clock == "perf_counter" else f", clock {self.clock}"
    return (f"load {fmt(self.before)} -> {fmt(self.after)} on {self.before['cores']} cores"
            f"{clock}, commit {self.before['commit']}, {self.before['date']}")

  def format(self) -> str:
    """Several lines: median time per side, each ratio with its IQR and verdict, context."""
    head = f"{self.label}: " if self.label else ""
    lines = [head + " | ".join(f"{n} {_ms(self.median_s(n))}" for n in self.names)
             + " (median per call)"]
    lines += ["  " + self.ratio(n).format() for n in self.names if n != self.baseline]
    lines.append("  " + self.context())
    return "\n".join(lines)

  def format_row(self, side: str | None = None) -> str:
    """One markdown row matching :func:`table_header`: label | side time | baseline time |
    ratio (IQR) | verdict | load | cores | commit | date."""
    r = self.ratio(side)
    lo, hi = r.iqr
    load = "/".join(f"{x:.1f}" for x in self.before["load"])
    return (f"| {self.label} | {_ms(self.median_s(r.side))} | {_ms(self.median_s(self.baseline))} "
            f"| {r.median:.2f} ({lo:.2f}-{hi:.2f}) | {r.verdict} | {load} | "
            f"{self.before['cores']} | {self.before['commit']} | {self.before['date']} |")

  def as_dict(self) -> dict:
    """JSON-ready summary (no outputs): medians in seconds, ratios, verdicts, context."""
    return dict(label=self.label, median_s={n: self.median_s(n) for n in self.names},
                ratios={n: dict(over=self.baseline, median=self.ratio(n).median,
                                iqr=list(self.ratio(n).iqr), verdict=self.ratio(n).verdict,
                                pairs=len(self.ratio(n).ratios))
                        for n in self.names if n != self.baseline},
                clock=self.clock, machine_before=dict(self.before),
                machine_after=dict(self.after))


def table_header(side: str = "ours", baseline: str = "baseline") -> str:
  """The markdown header (two lines) for :meth:`Comparison.format_row`."""
  return (f"| case | {side} | {baseline} | {side} / {baseline} (IQR) | verdict | load 1/5/15 min "
          f"| cores | commit | date |\n|---|---|---|---|---|---|---|---|---|")


def _ms(seconds: float) -> str:
  return f"{seconds:.3g} s" if seconds >= 1.0 else f"{seconds * 1e3:.3g} ms"


def compare(sides: Mapping[str, Callable[[], Any]], *, pairs: int = 7, warmup: int = 1,
            baseline: str | None = None, label: str = "", self_timed: bool = False,
            clock: Callable[[], float] = time.perf_counter,
            machine_info: Callable[[], dict] = machine) -> Comparison:
  """Runs every side ``warmup + pairs`` times, interleaved, and returns the kept times.

  sides: name -> zero-argument callable doing one unit of work (at least two sides). The
    first side is the numerator of :attr:`Comparison.median_ratio`.
  pairs: rounds kept (one ratio each); warmup: rounds run first and thrown away.
  baseline: the denominator of every ratio (default: the last side).
  self_timed: each callable returns the seconds it measured itself (e.g. the mean step time
    a training loop logged, or a time read from a subprocess) instead of being timed here.
  clock: seconds, monotonic (``CLOCKS``; tests inject a fake one); machine_info: see
    :func:`machine`.
  """
  names = tuple(sides)
  if len(names) < 2:
    raise ValueError(f"compare needs at least two sides, got {list(names)}")
  if pairs < 1 or warmup < 0:
    raise ValueError(f"need pairs >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}")
  baseline = names[-1] if baseline is None else baseline
  if baseline not in sides:
    raise ValueError(f"baseline {baseline!r} is not one of the sides {list(names)}")
  before = machine_info()
  times = {n: [] for n in names}
  outputs = {}
  for i in range(warmup + pairs):
    order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
    for name in order:
      t0 = clock()
      out = _wait(sides[name]())
      elapsed = clock() - t0
      if self_timed:
        elapsed = float(out)
      if i >= warmup:
        times[name].append(elapsed)
      outputs[name] = out
  return Comparison(label, names, baseline, {n: tuple(t) for n, t in times.items()}, outputs,
                    before, machine_info(),
                    "self-timed" if self_timed else getattr(clock, "__name__", type(clock).__name__))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = ("wall: elapsed seconds (what a user waits); cpu: this process's CPU seconds, all "
              "threads (steadier on a loaded machine, e.g. under taskset -c 0; counts spinning "
              "worker threads, misses time spent waiting)")
PAIRS_HELP = "interleaved rounds kept (one ratio each; >= 7 for a usable IQR)"
WARMUP_HELP = "interleaved rounds run first and discarded (compilation, caches)"


def add_flags(parser, pairs: int = 7, warmup: int = 1, pairs_flag: str = "--pairs") -> None:
  """``--pairs`` (or ``pairs_flag``) and ``--warmup`` on an argparse parser."""
  parser.add_argument(pairs_flag, dest="pairs", type=int, default=pairs, help=PAIRS_HELP)
  parser.add_argument("--warmup", type=int, default=warmup, help=WARMUP_HELP)
  parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help=CLOCK_HELP)


def define_absl_flags(pairs: int = 7, warmup: int = 1):
  """The same two flags for an absl script; returns their holders (pairs, warmup)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return (flags.DEFINE_integer("pairs", pairs, PAIRS_HELP),
          flags.DEFINE_integer("warmup", warmup, WARMUP_HELP))
