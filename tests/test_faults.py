"""Fault injection: the trainer (``python -m mirage_jax.main``) killed and restarted.

A campaign runs the tiny trainer as a subprocess and interrupts it again and again:
SIGKILL after a step, SIGKILL inside an async checkpoint save before Orbax commits it (a
``<step>.orbax-checkpoint-tmp`` folder is left), SIGTERM (must save and exit 0); after each
fault it restarts the same command. The trainer interrupts itself at the named point
(``MIRAGE_FAULT_AT``, ``mirage_jax/faults.py``), so every fault lands where it is meant to,
without a race between the test and the trainer. At the end every step's loss, the final train state and
the input position (derived from the step) must equal an uninterrupted run's, bit for bit, and every
checkpoint left on disk must restore.

Runs use one CPU device and a persistent compilation cache shared by the module, so only
the first run compiles. ``benchmarks/bench_faults.py`` runs a longer campaign.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mirage_jax import checkpoint, faults
from tests.conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
CHECKPOINT_EVERY = 2
TMP_SUFFIX = ".orbax-checkpoint-tmp"
RUN_DEADLINE_S = 300  # one trainer run on a loaded 2-core machine (the first compiles)
# The tiny config at 16x16 on a 10-clip procedural dataset; checkpoints every 2 steps.
DATASET = dict(num_clips=10, frames_per_clip=6, resolution=16, moving_objects=0)


def trainer_command(workdir: Path, data_dir: Path, steps: int = STEPS, *extra: str) -> list[str]:
  """``python -m mirage_jax.main`` with the tiny config shrunk for fault tests."""
  build = [f"--config.data.build.{k}={v}" for k, v in DATASET.items()]
  return [sys.executable, "-m", "mirage_jax.main", "--config=experiments/tiny_cpu.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *build,
          "--config.data.resolution=(16, 16)", "--config.data.read_threads=0",
          "--config.data.read_buffer_size=1", "--config.autoencoder.base_channels=8",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.tensorboard=False", "--config.train.peak_tflops_per_device=1.0",
          f"--config.checkpoint.every={CHECKPOINT_EVERY}", "--config.checkpoint.keep=3", *extra]


def trainer_env(cache_dir: Path) -> dict[str, str]:
  """One CPU device; compiled programs cached on disk so restarts skip compilation."""
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(1),
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="3")


def build_dataset(data_dir: Path) -> None:
  """The procedural dataset the trainer command reads (built once, reused by every run)."""
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  builders.prepare(builders.make_builder("procedural_rooms", str(data_dir), **DATASET))


# ----------------------------------------------------------------------------- reading a workdir


def logged(workdir: Path) -> dict[int, dict]:
  """metrics.jsonl by step; a step logged again after a restart keeps its last record."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return {}
  rows = {}
  for line in path.read_text().splitlines():
    row = json.loads(line)  # a half-written line would fail here
    rows[row["step"]] = row
  return rows


def logged_steps(workdir: Path) -> list[int]:
  """Steps of the complete lines of metrics.jsonl (a killed run may leave half a line)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  text = path.read_text()
  lines = text[:text.rfind("\n") + 1].splitlines()
  return [json.loads(line)["step"] for line in lines]


def last_logged_step(workdir: Path) -> int:
  return (logged_steps(workdir) or [0])[-1]


def complete_steps(workdir: Path) -> list[int]:
  """Steps with a finished checkpoint (Orbax renames the temporary folder at the end)."""
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def saves_in_progress(workdir: Path) -> set[tuple[str, int, int]]:
  """(name, inode, mtime) of the temporary folders of checkpoint saves under way (or killed):
  a folder a later save wrote into (or made anew) is another element."""
  folder = workdir / "checkpoints"
  if not folder.is_dir():
    return set()
  found = set()
  for p in folder.iterdir():
    try:
      if p.name.endswith(TMP_SUFFIX):
        st = p.stat()
        found.add((p.name, st.st_ino, st.st_mtime_ns))
    except FileNotFoundError:  # renamed into place meanwhile
      pass
  return found


def load_checkpoint(workdir: Path, step: int) -> dict:
  """The train state of one checkpoint as NumPy; fails if corrupt. (No input state is saved:
  the input position is derived from the state's step.)"""
  step_dir = workdir / "checkpoints" / str(step)
  with ocp.PyTreeCheckpointer() as ckptr:
    path = (step_dir / checkpoint.STATE).absolute()
    meta = ckptr.metadata(path)
    abstract = checkpoint._replicated_abstract(checkpoint._tree(meta.item_metadata))  # pylint: disable=protected-access
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=checkpoint._restore_args(abstract)))  # pylint: disable=protected-access
  return jax.tree.map(np.asarray, state)


# ----------------------------------------------------------------------------- the campaign


def wait_for(proc: subprocess.Popen, log: Path, what: str, deadline_s: float = RUN_DEADLINE_S) -> int:
  """``proc``'s exit status; kills it and fails, naming ``what`` and its log, past the deadline."""
  try:
    return proc.wait(timeout=deadline_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise AssertionError(f"{what} did not end within {deadline_s} s; log tail:\n"
                         f"{log.read_text()[-3000:]}") from None


@dataclasses.dataclass
class Fault:
  """One interruption, ``after_steps`` (>= 1) steps after where the run starts.

  kind: "kill" (SIGKILL after that step), "kill_saving" (SIGKILL inside the first
  checkpoint save at or after that step, before Orbax commits it) or "term" (SIGTERM after
  that step: the trainer must save that step and exit 0).
  """
  kind: str
  after_steps: int

  def step(self, start: int) -> int:
    """The step the fault fires at in a run that starts from step ``start``."""
    step = start + self.after_steps
    if self.kind == "kill_saving":  # the next checkpoint step
      return -(-step // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    return step

  def spec(self, start: int) -> str:
    """``MIRAGE_FAULT_AT`` for the run (``mirage_jax/faults.py``)."""
    if self.kind == "kill_saving":
      return faults.spec("saving", self.step(start), "kill")
    return faults.spec("step", self.step(start), {"kill": "kill", "term": "term"}[self.kind])


@dataclasses.dataclass
class Outcome:
  """What one faulted run did, and whether the restart after it resumed correctly."""
  fault: Fault
  at_step: int  # where the fault fired
  injected: bool = False  # the fault stopped a running trainer where it was meant to
  during_save: bool = False  # a checkpoint save was left unfinished by the kill
  latest_before_restart: int | None = None
  resumed_from: int | None = None  # from the next run's log (None: started afresh)

  @property
  def resumed_correctly(self) -> bool:
    return self.resumed_from == self.latest_before_restart


def random_faults(count: int, seed: int, max_steps: int = 3) -> list[Fault]:
  """``count`` faults, kinds and steps (1..max_steps after each start) drawn from ``seed``."""
  rng = random.Random(seed)
  return [Fault(rng.choice(["kill", "kill_saving", "term"]), rng.randint(1, max_steps))
          for _ in range(count)]


def _outcome(rc: int, log: Path, workdir: Path, fault: Fault, start: int,
             old_saves: set) -> Outcome:
  """How a run started at step ``start`` and faulted ended: exit status, the fault's own line
  in its log, its last logged step and the checkpoints it left."""
  at_step = fault.step(start)
  outcome = Outcome(fault, at_step)
  new_saves = saves_in_progress(workdir) - old_saves
  fired = f"{faults.ENV}={fault.spec(start)}: fault injected" in log.read_text()
  if fault.kind == "term":
    assert rc == 0, f"SIGTERM after step {at_step}: exit status {rc}"
    # Saved the step it stopped at, and ran no further.
    outcome.injected = fired and (complete_steps(workdir)[-1:] == [at_step] ==
                                  [last_logged_step(workdir)])
  elif fault.kind == "kill":
    outcome.injected = fired and rc == -signal.SIGKILL and last_logged_step(workdir) == at_step
  else:  # killed inside the save of at_step: its temporary folder is left, uncommitted
    outcome.injected = (fired and rc == -signal.SIGKILL and
                        any(name == f"{at_step}{TMP_SUFFIX}" for name, *_ in new_saves)
                        and at_step not in complete_steps(workdir))
  outcome.during_save = bool(new_saves)
  outcome.latest_before_restart = (complete_steps(workdir) or [None])[-1]
  return outcome


def run_campaign(workdir: Path, data_dir: Path, env: dict, faults_: list[Fault],
                 logs: Path, steps: int = STEPS) -> list[Outcome]:
  """Runs the trainer, interrupting it with each fault in turn, then lets it finish.

  Returns:
    One outcome per fault. Raises AssertionError when a run outlives its deadline, the last
    run does not finish cleanly or a SIGTERM does not end in exit status 0.
  """
  logs.mkdir(parents=True, exist_ok=True)
  outcomes: list[Outcome] = []
  env = {k: v for k, v in env.items() if k != faults.ENV}
  for attempt in range(len(faults_) + 1):
    log = logs / f"run{attempt}.txt"
    start = (complete_steps(workdir) or [0])[-1]  # where the run resumes (checked below)
    fault = faults_[attempt] if attempt < len(faults_) else None
    run_env = dict(env, **{faults.ENV: fault.spec(start)}) if fault else env
    old_saves = saves_in_progress(workdir)  # left over from earlier kills
    with open(log, "w") as f:
      proc = subprocess.Popen(trainer_command(workdir, data_dir, steps), cwd=ROOT, env=run_env,
                              stdout=f, stderr=subprocess.STDOUT)
    rc = wait_for(proc, log, f"trainer run {attempt} ({run_env.get(faults.ENV, 'no fault')})")
    if fault:
      outcomes.append(_outcome(rc, log, workdir, fault, start, old_saves))
    else:
      assert rc == 0, log.read_text()[-3000:]
    if attempt:  # where this run says it resumed from
      found = re.search(r"resumed from step (\d+)", log.read_text())
      outcomes[attempt - 1].resumed_from = int(found.group(1)) if found else None
  return outcomes


def check_against(reference: Path, workdir: Path, steps: int = STEPS) -> dict[str, int]:
  """Compares a faulted workdir with the uninterrupted one; returns counts of problems."""
  ref, got = logged(reference), logged(workdir)
  wrong_losses = sum(got.get(s, {}).get("loss") != ref[s]["loss"] for s in range(1, steps + 1))
  corrupt = 0
  for step in complete_steps(workdir):
    try:
      load_checkpoint(workdir, step)
    except Exception:  # pylint: disable=broad-except
      corrupt += 1
  final_ref, final_got = load_checkpoint(reference, steps), load_checkpoint(workdir, steps)
  state_differs = int(any(jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(a, b), final_ref, final_got))))
  return dict(wrong_or_missing_losses=wrong_losses, corrupt_checkpoints=corrupt,
              final_state_differs=state_differs,
              data_position_differs=int(final_ref["step"] != final_got["step"]))


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A built dataset, a compilation cache and one uninterrupted reference run."""
  root = tmp_path_factory.mktemp("faults")
  data_dir, env = root / "data", trainer_env(root / "jax_cache")
  build_dataset(data_dir)
  reference = root / "reference"
  done = subprocess.run(trainer_command(reference, data_dir), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=RUN_DEADLINE_S)
  assert done.returncode == 0, done.stderr[-3000:]
  return root, data_dir, env, reference


@pytest.mark.timeout(900)  # six trainer runs (the reference compiles, the rest hit the cache)
def test_killed_and_restarted_training_equals_an_uninterrupted_run(setup):
  root, data_dir, env, reference = setup
  assert sorted(logged(reference)) == list(range(1, STEPS + 1))
  # SIGKILL after step 3 (step 2's async save may or may not be committed by then: either
  # way the restart must resume from what is); SIGKILL inside the next save 2 steps on;
  # SIGTERM 1 step on; SIGKILL inside the next save 2 steps on; then the run to the end.
  faults_ = [Fault("kill", 3), Fault("kill_saving", 2), Fault("term", 1),
             Fault("kill_saving", 2)]
  workdir = root / "faulted"
  outcomes = run_campaign(workdir, data_dir, env, faults_, root / "logs")
  for o in outcomes:
    assert o.injected, o
    assert o.resumed_correctly, o
    if o.fault.kind == "kill_saving":  # the restart ignored the unfinished checkpoint
      assert o.during_save and (o.latest_before_restart or 0) < o.at_step, o
  problems = check_against(reference, workdir)
  assert problems == dict(wrong_or_missing_losses=0, corrupt_checkpoints=0,
                          final_state_differs=0, data_position_differs=0)
