"""Batched evaluation of a world-model export: revisit consistency, cost scaling, moving objects.

  python -m mirage_jax.evaluate --checkpoint=EXPORT --benchmark=revisit \\
      --data_dir=data --output_dir=out/revisit [--backends=none,mirage,voxel] [--num_trajectories=8]
  python -m mirage_jax.evaluate --checkpoint=EXPORT --benchmark=revisit \\
      --procedural_seeds=100000:100008 --num_frames=48 --output_dir=out/revisit_heldout
  python -m mirage_jax.evaluate --checkpoint=EXPORT --benchmark=scaling \\
      --output_dir=out/scaling [--lengths=64,256,1024,4096]
  python -m mirage_jax.evaluate --checkpoint=EXPORT --benchmark=objects \\
      --output_dir=out/objects [--procedural_seeds=200000:200008] [--moving_objects=2] \\
      [--object_rows=mirage,voxel,voxel+objects]

Revisit (``evaluation/revisit.py`` has the protocol): trajectories are the ``--split`` of a
built dataset (``--data_dir``/``--dataset``, resized to the model's resolution), or loop
clips rendered on the fly from ``--procedural_seeds=a:b`` (pick seeds the training dataset
did not use: it used ``first_seed .. first_seed + num_clips - 1``). With
``--memory_maze_context=N`` (needs the memory_maze extra), Memory Maze retrace rollouts of
2N frames (``--memory_maze_seeds``, at most ``--num_trajectories``) are scored as well: the
first N given as context (written into memory from ground truth), the last N scored.

A Wan-family export (``config.denoiser.model.family == 'wan'``, ``mirage_jax/wan_rollout.py``)
runs the revisit benchmark through the same rows: every row generates with the Wan DiT +
VACE (the backend's read in the VACE slot), writing each latent with the trajectory's
ground-truth depth of its frame (the reference's depth model is not available); it has no
generated depth, so its rows carry no geometric or depth scores. ``--caption_embedding``,
``--empty_text_embedding`` and ``--guidance_scale`` are as in ``mirage_jax.generate``. The
scaling and objects benchmarks and the Memory Maze rows run the small family only.

Batching (revisit): each process generates ``--trajectory_batch`` trajectories at once (default
one per local device): per chunk, one jitted step advances all of them, the trajectory axis
sharded over the process's devices; shorter trajectories are padded and masked, and each is
sampled with ``--seed``, so scores do not depend on the batching. ``chunk_seconds`` is the
wall time of one such step (nothing blocks per chunk; ``--benchmark=scaling`` is the timing).

Several processes (``jax.distributed``, same flags as ``mirage_jax.main``): trajectory i
(revisit and objects) runs on process ``i % process_count`` (each trajectory is one sequential rollout, so the
work splits by trajectory, not inside one); each process writes its results to
``parts/process_<k>.json`` and its videos, all processes meet at a barrier, and process 0
merges the parts into ``metrics.json`` and the plots. ``--output_dir`` must therefore be on a
file system every process sees. Scaling runs on process 0 only (it is a timing benchmark);
the others wait for it at the end.

Objects (``evaluation/objects_benchmark.py`` has the protocol): procedural loop clips of
``--procedural_seeds`` (default 200000:200008, held out) with ``--moving_objects`` objects,
``--num_frames`` long (default 96), the first ``--object_context`` frames given (default
half); each row of
``--object_rows`` (``mirage``, ``voxel`` keeping predicted moving content out of its cache,
``voxel+objects`` carrying it in object slots) scored for ghosting in the static region at
revisits, object PSNR, position error, detection and identity at re-entry.

Outputs in ``--output_dir`` (refused if non-empty unless ``--overwrite``; files are written
atomically):

  index.html              the report: claims PASS/FAIL, tables, plots, videos side by side,
                          command and config (``evaluation/index_html.py``; static, offline);
  metrics.json            every number: per trajectory and row, summaries, per-frame curves
                          (revisit), or the scaling entries and protocol (scaling);
  quality_vs_frame.png    mean PSNR against frame index per row (revisit), also
  ssim_vs_frame.png       SSIM; memory_maze_*.png for the Memory Maze variant;
  videos/<traj>/<row>.mp4 generated | ground truth | memory coverage (revisit), and
  videos/<traj>/ground_truth.mp4;
  parts/process_<k>.json  each process's results (revisit);
  scaling.json            the scaling entries (``report`` schema) and
  cost_vs_length.png      their plot (scaling);
  videos/<traj>/<row>.mp4 generated | ground truth | predicted dynamic mask (objects).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

from mirage_jax import distributed, paths
from mirage_jax.errors import InputError, parse_flags, run_cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Denoiser export (python -m mirage_jax.export).")
_AUTOENCODER = flags.DEFINE_string("autoencoder", None,
                                   "Autoencoder export (default: the one the denoiser was trained with).")
_BENCHMARK = flags.DEFINE_enum("benchmark", None, ["revisit", "scaling", "objects"], "Which benchmark.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the report goes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the outputs in a non-empty --output_dir.")
_BACKENDS = flags.DEFINE_list("backends", ["none", "frame_bank", "rgb_points", "mirage", "voxel"],
                              "Memory backends to compare.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every backend).")
# Revisit.
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built datasets (python -m data_pipelines.build).")
_DATASET = flags.DEFINE_string("dataset", "procedural_rooms", "Dataset name under --data_dir.")
_CONFIG_NAME = flags.DEFINE_string("config_name", "default", "Dataset config name.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split.")
_SEEDS = flags.DEFINE_string("procedural_seeds", None,
                             "a:b renders loop clips of seeds a..b-1 instead of reading --data_dir "
                             "(objects: default 200000:200008).")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", None,
                                   "Frames per trajectory (procedural: rendered, default 48; dataset: "
                                   "first frames kept, default all).")
_NUM_TRAJ = flags.DEFINE_integer("num_trajectories", None, "Trajectories to evaluate (default all).")
_BATCH = flags.DEFINE_integer("trajectory_batch", 0, "Trajectories generated at once by one "
                              "jitted chunk step, sharded over this process's devices (revisit; "
                              "0 = one per local device).")
_ORACLE = flags.DEFINE_bool("oracle", True, "Add the oracle row (memory written from ground truth).")
_COMPOSITE = flags.DEFINE_bool("composite", True, "Add the trivial composite row.")
_VIDEOS = flags.DEFINE_bool("videos", True, "Write side-by-side videos.")
_MAZE = flags.DEFINE_integer("memory_maze_context", 0,
                             "N > 0: also score Memory Maze retraces of 2N frames with N given.")
_MAZE_SEEDS = flags.DEFINE_string("memory_maze_seeds", "1000000:1000004",
                                  "a:b maze seeds for --memory_maze_context (held out of datasets "
                                  "built from seed 0); --num_trajectories caps them too.")
_DISTANCE = flags.DEFINE_float("revisit_distance", 0.5, "Metres between a revisit and its first visit.")
_ANGLE = flags.DEFINE_float("revisit_angle_deg", 30.0, "Degrees between a revisit and its first visit.")
_GAP = flags.DEFINE_integer("min_revisit_gap", 4, "Frames between a revisit and its first visit.")
# Scaling.
_LENGTHS = flags.DEFINE_list("lengths", ["64", "256", "1024", "4096"], "Trajectory lengths (frames).")
_TIMED = flags.DEFINE_integer("timed_chunks", 2, "Chunks timed at the end of each length.")
_PERIOD = flags.DEFINE_integer("scaling_period", 64, "Frames per loop of the scaling camera path.")
# Objects.
_OBJECT_ROWS = flags.DEFINE_list("object_rows", ["mirage", "voxel", "voxel+objects"],
                                 "Rows of the objects benchmark (evaluation/objects_benchmark.py ROWS).")
_MOVING = flags.DEFINE_integer("moving_objects", 2, "Moving objects per clip (objects).")
_OBJECT_CONTEXT = flags.DEFINE_integer(
    "object_context", None, "Frames given from ground truth and not scored (objects; default: "
    "the first half, so the memory has watched the objects move before it must recall the room).")
_MIN_PIXELS = flags.DEFINE_integer("min_object_pixels", 4, "Pixels an object needs to count as visible.")
_REENTRY_GAP = flags.DEFINE_integer("reentry_gap", 4, "Frames out of view before a re-entry, at least.")
# Wan family (see mirage_jax/generate.py): text of every trajectory and CFG.
_CAPTION = flags.DEFINE_string("caption_embedding", None, "Wan: a caption's umT5 embedding for every "
                               "trajectory, .npy (Lt <= 512, text_dim) (default: the empty prompt).")
_EMPTY_TEXT = flags.DEFINE_string("empty_text_embedding", None, "Wan: the empty prompt's umT5 "
                                  "embedding, .npy (Lt <= 512, text_dim) (default: zeros).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Wan: classifier-free guidance scale "
                               "(default: config.sampler, 0 = off).")
# Multi-process.
_INIT_DISTRIBUTED = distributed.define_flags()

_TABLE = ("row", "psnr_all", "ssim_all", "psnr_revisit", "ssim_revisit", "psnr_first_visit",
          "geometric_psnr", "coverage_revisit", "cache_bytes", "chunk_seconds")


# ----------------------------------------------------------------------------- trajectories


def _seed_range(text: str, flag: str) -> range:
  try:
    a, b = (int(x) for x in text.split(":"))
  except ValueError:
    raise InputError(f"--{flag}", flag, f"expected a:b, got {text!r}") from None
  if not 0 <= a < b:
    raise InputError(f"--{flag}", flag, f"need 0 <= a < b, got {text!r}")
  return range(a, b)


def _trajectory_loaders(resolution) -> list:
  """A loader per trajectory, in order; each returns a ``revisit.Trajectory``."""
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  h, w = resolution
  if _SEEDS.value:
    from data_pipelines import procedural  # pylint: disable=g-import-not-at-top
    num_frames = _NUM_FRAMES.value or 48

    def render(seed):
      clip = procedural.render_clip(seed, num_frames, h, w, trajectory="loop")
      return revisit.Trajectory(name=f"seed{seed}", fps=float(clip["fps"]),
                                **revisit.fit_clip(clip, (h, w)))
    loaders = [lambda s=s: render(s) for s in _seed_range(_SEEDS.value, "procedural_seeds")]
  elif _DATA_DIR.value:
    source = builders.load(_DATA_DIR.value, _DATASET.value, _CONFIG_NAME.value).as_data_source(_SPLIT.value)

    def read(i):
      clip = builders.record_to_clip(source[i])
      if not clip["has_depth"]:
        raise InputError(_DATA_DIR.value, "has_depth", f"record {i} ({clip['clip_id']}) has no depth")
      return revisit.Trajectory(name=f"{i:04d}_{clip['clip_id']}", fps=float(clip["fps"]),
                                **revisit.fit_clip(clip, (h, w), _NUM_FRAMES.value))
    loaders = [lambda i=i: read(i) for i in range(len(source))]
  else:
    raise InputError("--data_dir", "data_dir", "give --data_dir (a built dataset) or --procedural_seeds=a:b")
  return loaders[:_NUM_TRAJ.value] if _NUM_TRAJ.value else loaders


def _memory_maze_loaders(resolution) -> list:
  """Loaders of Memory Maze retraces: 2N frames, the first N given as context."""
  n = _MAZE.value
  if n <= 0:
    return []
  from data_pipelines import memory_maze  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  if not memory_maze.is_available():
    raise InputError("--memory_maze_context", "memory_maze", "needs the memory_maze extra "
                     "(pip install -e '.[memory_maze]', Debian's libosmesa6, MUJOCO_GL=osmesa)")
  h, w = resolution

  def roll(seed):
    clip = memory_maze.rollout_clip(seed, 2 * n, h, w, policy="retrace")
    return revisit.Trajectory(name=f"maze{seed}", fps=float(clip["fps"]), context=n,
                              **revisit.fit_clip(clip, (h, w)))
  loaders = [lambda s=s: roll(s) for s in _seed_range(_MAZE_SEEDS.value, "memory_maze_seeds")]
  return loaders[:_NUM_TRAJ.value] if _NUM_TRAJ.value else loaders


# ----------------------------------------------------------------------------- benchmarks


def _revisit(config, ae, dn) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import report, revisit  # pylint: disable=g-import-not-at-top
  out = _OUTPUT.value
  resolution = tuple(config.data.resolution)
  groups = {"revisit": _trajectory_loaders(resolution), "memory_maze": _memory_maze_loaders(resolution)}
  k, count = jax.process_index(), jax.process_count()
  # Trajectory i runs on process i % count; each loads only its own.
  mine = {g: [load() for i, load in enumerate(loaders) if i % count == k] for g, loaders in groups.items()}
  lengths = [len(t.frames) for ts in mine.values() for t in ts]
  results = {g: {} for g in groups}
  if lengths:
    runner = revisit.RevisitRunner(
        config, ae, dn, _BACKENDS.value, max(lengths), oracle=_ORACLE.value, composite=_COMPOSITE.value,
        pairing=dict(max_distance=_DISTANCE.value, max_angle_deg=_ANGLE.value, min_gap=_GAP.value),
        wan_options=_wan_options(config))
    video_dir = os.path.join(out, "videos") if _VIDEOS.value else None
    batch = _BATCH.value or jax.local_device_count()  # default: one per device of this process
    for group, trajs in mine.items():
      for i in range(0, len(trajs), batch):
        part = trajs[i:i + batch]
        for t, res in zip(part, runner.run_batch(part, seed=_SEED.value, video_dir=video_dir)):
          results[group][t.name] = res
          print(f"[process {k}] {group} {t.name}: done", flush=True)
  merged = _merge_parts(out, results)
  if merged is None:
    return
  metrics = dict(benchmark="revisit", checkpoint=_CHECKPOINT.value, backends=_BACKENDS.value,
                 seed=_SEED.value, resolution=list(resolution), chunk_frames=int(config.denoiser.target_frames),
                 oracle_backend=config.memory.backend,
                 pairing=dict(max_distance=_DISTANCE.value, max_angle_deg=_ANGLE.value, min_gap=_GAP.value),
                 source=_SEEDS.value and f"procedural loop seeds {_SEEDS.value}" or
                 f"{_DATA_DIR.value}/{_DATASET.value}/{_CONFIG_NAME.value}:{_SPLIT.value}")
  for group, res in merged.items():
    if not res:
      continue
    summary, curves = revisit.summarize(res)
    prefix = "" if group == "revisit" else f"{group}_"
    metrics[group] = dict(summary=summary, curves=curves, trajectories=res)
    report.plot_quality_vs_frame(os.path.join(out, f"{prefix}quality_vs_frame.png"),
                                 {r: c["psnr"] for r, c in curves.items()}, title=f"{group}: PSNR vs ground truth")
    report.plot_quality_vs_frame(os.path.join(out, f"{prefix}ssim_vs_frame.png"),
                                 {r: c["ssim"] for r, c in curves.items()}, ylabel="SSIM",
                                 title=f"{group}: SSIM vs ground truth")
    rows = [dict(row=r, **{c: s.get(c) for c in _TABLE[1:]}) for r, s in summary.items()
            if r not in ("reference", "revisit_frames")]
    print(f"\n{group}: {len(res)} trajectories, {summary['revisit_frames']} revisit frames; "
          f"ground truth floor: {summary['reference']}")
    print(report.format_table(rows, _TABLE, ".3f"))
  report.write_metrics_json(os.path.join(out, "metrics.json"), metrics)


def _merge_parts(out: str, results: dict) -> dict | None:
  """Every process writes its ``{group: {trajectory: result}}`` to ``parts/process_<k>.json``;
  once all have, process 0 gets them merged, in trajectory-name order (so independent of the
  process count, and read back from JSON with one process too); the others get None."""
  import jax  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  k, count = jax.process_index(), jax.process_count()
  os.makedirs(os.path.join(out, "parts"), exist_ok=True)
  report.write_metrics_json(os.path.join(out, "parts", f"process_{k}.json"), results)
  if count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("mirage_jax.evaluate: parts written")
  if k != 0:
    return None
  merged = {g: {} for g in results}
  for i in range(count):
    with open(os.path.join(out, "parts", f"process_{i}.json")) as f:
      for g, res in json.load(f).items():
        merged[g].update(res)
  return {g: dict(sorted(res.items())) for g, res in merged.items()}


def _wan_options(config) -> dict | None:
  """WanRollout's text/CFG options of a Wan-family model (None for the small family)."""
  from mirage_jax import rollout, wan_rollout  # pylint: disable=g-import-not-at-top
  if rollout.model_family(config) != "wan":
    return None
  return wan_rollout.rollout_options(config, _CAPTION.value, _EMPTY_TEXT.value, _GUIDANCE.value)


def _scaling(config, ae, dn) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import report, scaling  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  try:
    lengths = [int(x) for x in _LENGTHS.value]
  except ValueError:
    raise InputError("--lengths", "lengths", f"expected integers, got {_LENGTHS.value}") from None
  entries = scaling.run_scaling(config, ae, dn, _BACKENDS.value, lengths, timed_chunks=_TIMED.value,
                                period=_PERIOD.value, seed=_SEED.value, progress=True)
  out = _OUTPUT.value
  report.write_scaling_json(os.path.join(out, "scaling.json"), entries)
  report.plot_cost_vs_length(os.path.join(out, "cost_vs_length.png"), entries,
                             title="cost vs trajectory length")
  report.write_metrics_json(os.path.join(out, "metrics.json"), dict(
      benchmark="scaling", checkpoint=_CHECKPOINT.value, backends=_BACKENDS.value, lengths=lengths,
      resolution=list(config.data.resolution), chunk_frames=int(config.denoiser.target_frames),
      timed_chunks=_TIMED.value, period=_PERIOD.value, voxel_capacity=int(config.memory.settings.capacity),
      device=str(jax.devices()[0].device_kind), entries=entries))
  print(report.format_table(entries, list(report.SCALING_FIELDS), ".4f"))


def _object_settings() -> tuple[range, int, int]:
  """The objects benchmark's seeds, frame count and context; refuses bad object flags."""
  from mirage_jax.evaluation import objects_benchmark  # pylint: disable=g-import-not-at-top
  objects_benchmark.check_rows(_OBJECT_ROWS.value)
  # 96-frame loops: at 48 frames half of the clips have no re-entry at all.
  seeds = _seed_range(_SEEDS.value or "200000:200008", "procedural_seeds")
  num_frames = _NUM_FRAMES.value or 96
  context = num_frames // 2 if _OBJECT_CONTEXT.value is None else _OBJECT_CONTEXT.value
  for flag in (_MOVING, _MIN_PIXELS, _REENTRY_GAP, _OBJECT_CONTEXT):
    if flag.value is not None and flag.value < 1:
      raise InputError(f"--{flag.name}", flag.name, f"must be >= 1, got {flag.value}")
  if context >= num_frames:
    raise InputError("--object_context", "object_context",
                     f"must be < --num_frames ({num_frames}), got {context}")
  return (seeds[:_NUM_TRAJ.value] if _NUM_TRAJ.value else seeds), num_frames, context


def _objects(config, ae, dn) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import objects_benchmark, report  # pylint: disable=g-import-not-at-top
  seeds, num_frames, context = _object_settings()
  pairing = dict(max_distance=_DISTANCE.value, max_angle_deg=_ANGLE.value, min_gap=_GAP.value)
  out = _OUTPUT.value
  video_dir = os.path.join(out, "videos") if _VIDEOS.value else None
  k, count = jax.process_index(), jax.process_count()
  mine = [seed for i, seed in enumerate(seeds) if i % count == k]  # as revisit: by trajectory
  results = {}
  if mine:
    runner = objects_benchmark.ObjectsRunner(config, ae, dn, _OBJECT_ROWS.value, num_frames,
                                             pairing=pairing, min_pixels=_MIN_PIXELS.value,
                                             gap=_REENTRY_GAP.value)
  for seed in mine:
    clip = objects_benchmark.render_object_clip(seed, num_frames, config.data.resolution,
                                                _MOVING.value, context)
    results[clip.truth.name] = runner.run(clip, seed=_SEED.value, video_dir=video_dir)
    print(f"[process {k}] objects {clip.truth.name}: done", flush=True)
  merged = _merge_parts(out, {"objects": results})
  if merged is None:
    return
  results = merged["objects"]
  summary = objects_benchmark.summarize(results)
  report.write_metrics_json(os.path.join(out, "metrics.json"), dict(
      benchmark="objects", checkpoint=_CHECKPOINT.value, rows=_OBJECT_ROWS.value, seed=_SEED.value,
      resolution=list(config.data.resolution), chunk_frames=int(config.denoiser.target_frames),
      source=f"procedural loop seeds {seeds.start}:{seeds.stop}", num_frames=num_frames,
      moving_objects=_MOVING.value, context=context, pairing=pairing,
      reentry=dict(min_object_pixels=_MIN_PIXELS.value, gap=_REENTRY_GAP.value, span=3),
      summary=summary, trajectories=results))
  print(f"\nobjects: {len(results)} trajectories, " +
        ", ".join(f"{summary[c]} {c.replace('_', ' ')}" for c in objects_benchmark.COUNTS))
  print(report.format_table([dict(row=r, **summary[r]) for r in _OBJECT_ROWS.value],
                            ("row",) + objects_benchmark.SCALARS, ".3f"))


def _main() -> int:
  for flag, value in (("--checkpoint", _CHECKPOINT.value), ("--benchmark", _BENCHMARK.value),
                      ("--output_dir", _OUTPUT.value)):
    if not value:
      raise InputError(flag, flag[2:], "required")
  if paths.is_remote(_OUTPUT.value):  # os.makedirs would make a local folder named 'gs:'
    raise InputError("--output_dir", "output_dir", f"{_OUTPUT.value}: evaluate writes local "
                     "folders only (copy the report up afterwards)")
  paths.check_reachable(_CHECKPOINT.value, "--checkpoint")
  _INIT_DISTRIBUTED()
  import jax  # pylint: disable=g-import-not-at-top
  from mirage_jax import memory, rollout  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  if _BATCH.value < 0:
    raise InputError("--trajectory_batch", "trajectory_batch", f"must be >= 0, got {_BATCH.value}")
  unknown = [b for b in _BACKENDS.value if b not in memory.BACKEND_NAMES]
  if unknown:
    raise InputError("--backends", "backends", f"unknown {unknown[0]!r} (known: {', '.join(memory.BACKEND_NAMES)})")
  if _BENCHMARK.value == "objects":
    _object_settings()  # refuse bad flags before loading the model
  # The family decides which flags apply; checked before the (slow) model load.
  family = rollout.model_family(rollout.export_config(_CHECKPOINT.value))
  wan_flag = next((f.name for f in (_CAPTION, _EMPTY_TEXT, _GUIDANCE) if f.value is not None), None)
  if family != "wan" and wan_flag:
    raise InputError(f"--{wan_flag}", wan_flag, f"only the Wan family takes it; "
                     f"{_CHECKPOINT.value} is of family {family!r}")
  if family == "wan" and _BENCHMARK.value != "revisit":
    raise InputError("--benchmark", "benchmark", f"{_BENCHMARK.value!r} runs the small family "
                     "only; a Wan-family export runs --benchmark=revisit")
  if family == "wan" and _MAZE.value:
    raise InputError("--memory_maze_context", "memory_maze_context",
                     "Memory Maze context rows are not run for the Wan family")
  for flag in (_CAPTION, _EMPTY_TEXT):
    if flag.value is not None and not os.path.isfile(flag.value):
      raise InputError(flag.value, flag.name, "no such file (a .npy of shape (Lt, text_dim))")
  if jax.process_index() == 0:
    revisit.prepare_output_dir(_OUTPUT.value, _OVERWRITE.value)
  if jax.process_count() > 1:  # no process writes before process 0 has checked the directory
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("mirage_jax.evaluate: output dir ready")
  config, ae, dn = rollout.load_world_model(_CHECKPOINT.value, _AUTOENCODER.value)
  dict(revisit=_revisit, scaling=_scaling, objects=_objects)[_BENCHMARK.value](config, ae, dn)
  if jax.process_index() == 0:
    from mirage_jax.evaluation import index_html  # pylint: disable=g-import-not-at-top
    page = index_html.write_index(_OUTPUT.value, command=["python", "-m", "mirage_jax.evaluate",
                                                          *sys.argv[1:]],
                                  config_json=config.to_json_best_effort(indent=2))
    print(f"report: {page}")
  if jax.process_count() > 1:  # no process exits while process 0 still writes (scaling)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("mirage_jax.evaluate: done")
  return 0


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run_cli(_main)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
