"""Memory Maze as published (Po et al. 2025), scaled down: ``evaluate --benchmark=memory_maze``.

Po et al. 2025 ("Long-Context State-Space Video World Models") evaluate on Memory Maze at
64x64: 400 frames of an exploration trajectory are given, the next 400 are generated along
the recorded actions and scored against ground truth (PSNR, SSIM, LPIPS). Here, per held-out
maze (seeds disjoint from the training mazes, :func:`check_seeds`):

  1. ``2 N`` frames of an *exploration* trajectory (not a retrace) are rendered at 64x64
     with exact poses and depth (``data_pipelines.memory_maze``, policy ``explore``). The
     memory-maze package ships the environment only, no exploration or data-collection
     policy, so the explorer is ours: a scripted random walk with momentum over the maze's
     cells, driven through the environment's own discrete actions and physics.
  2. Frames ``< N`` are *given*: every row writes them into its memory from ground truth
     (encoded frames, ground-truth depth) and, as the recent clean context, conditions on
     their encodings (``Rollout.generate_batch(given_frames=...)``).
  3. Frames ``N .. 2N-1`` are generated along the recorded camera poses (the model is
     conditioned on poses, not actions) and scored: PSNR and SSIM per frame, their means
     over the generated frames (``psnr_all``, ``ssim_all``), and per-frame curves; LPIPS
     (``evaluation/lpips.py``, the table's ``lpips``: ``lpips_all``) when pretrained weights
     are given (``--lpips_backbone``; the paper's figure is AlexNet's, ``--lpips_net=alex``),
     else its column says it was not scored.

Rows (``evaluation/revisit.py``'s runner): the memory model with each memory backend
(``none``: its memory switched off, not a model trained without memory; ``frame_bank``:
the same model reading the frame bank it was not trained with; ``mirage``, ``voxel``),
``oracle`` (its backend with memory written from ground truth for every frame),
``composite`` (no model: ground-truth RGB points of every earlier frame where they cover,
the previous ground-truth frame elsewhere), and baselines trained for their job
(``--baseline_checkpoints``: ``none (trained)``, ``frame_bank (trained)``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mirage_jax.errors import InputError
from mirage_jax.evaluation import lpips, report, revisit

# Key of the protocol's results in evaluate's metrics.json.
GROUP = "memory_maze"
POLICY = "explore"
RESOLUTION = 64  # the paper's; frames are rendered at it, then fit to the model's
DEFAULT_CONTEXT = 100
PAPER = dict(context=400, generated=400, resolution=64)
# Po et al. 2025, Memory Maze (400 given, 400 generated, 64x64): their figures.
ANCHORS = (
    dict(row="Po et al. 2025: their model (SSM + local attention)", psnr_all=30.8,
         ssim_all=0.898, lpips=0.069),
    dict(row="Po et al. 2025: causal transformer", psnr_all=26.4),
    dict(row="Po et al. 2025: full-context upper bound", psnr_all=32.6),
)
# What each row is, for the table.
LABELS = {
    "none": "none (memory model, memory off)",
    "frame_bank": "frame_bank (memory model reading a frame bank)",
    "rgb_points": "rgb_points (memory model reading RGB points)",
    "mirage": "mirage (reference's append-only cache)",
    "voxel": "voxel (ours)",
    revisit.ORACLE: "oracle (memory written from ground truth)",
    revisit.COMPOSITE: "trivial composite (ground-truth points + previous frame)",
}
COLUMNS = ("row", "psnr_all", "ssim_all", "lpips", "psnr_revisit", "coverage_revisit")


def check_seeds(seeds: range, config, flag: str = "--memory_maze_seeds") -> None:
  """Refuses evaluation mazes the model was trained on.

  Args:
    seeds: the evaluation maze seeds.
    config: the model's config; a model trained on ``memory_maze`` used maze seeds
      ``first_seed .. first_seed + num_clips - 1`` (every split: the builder seeds by index).
  """
  data = config.data
  if data.get("dataset") != "memory_maze":
    return
  build = data.get("build") or {}
  first = int(build.get("first_seed", 0))
  train = range(first, first + int(build.get("num_clips", 0)))
  overlap = set(seeds) & set(train)
  if overlap:
    raise InputError(flag, flag.lstrip("-"), f"seeds {seeds.start}:{seeds.stop} overlap the "
                     f"training mazes {train.start}:{train.stop} (e.g. {min(overlap)}); "
                     "held-out mazes must be disjoint")


def check_context(n: int, flag: str = "--memory_maze_context") -> int:
  """The given (= generated) frame count N, refused unless 1 <= 2N <= a 9x9 episode."""
  if not 1 <= n <= 500:  # 2N frames of a 9x9 episode (1000 steps)
    raise InputError(flag, flag.lstrip("-"), f"must be in [1, 500] (2N frames of a 9x9 "
                     f"Memory Maze episode), got {n}")
  return n


def trajectory(seed: int, n: int, model_hw: Sequence[int], render=None) -> revisit.Trajectory:
  """One held-out maze: 2N ``explore`` frames rendered at 64x64, fit to the model, N given.

  Args:
    seed: maze (and explorer) seed. n: N. model_hw: (H, W) of the model.
    render: ``memory_maze.rollout_clip``-like callable (tests pass a fake); default the real one.
  Returns:
    a Trajectory of 2N frames at ``model_hw`` with ``context = N``.
  """
  if render is None:
    from data_pipelines import memory_maze  # pylint: disable=g-import-not-at-top
    render = memory_maze.rollout_clip
  clip = render(seed, 2 * n, RESOLUTION, RESOLUTION, policy=POLICY)
  return revisit.Trajectory(name=f"maze{seed}", fps=float(clip["fps"]), context=n,
                            **revisit.fit_clip(clip, tuple(model_hw)))


def describe(n: int, seeds: range, model_hw: Sequence[int]) -> dict[str, Any]:
  """The protocol's settings and its scale-down against the paper (for metrics.json; the
  LPIPS weights are metrics.json's ``lpips``)."""
  return dict(policy=POLICY, given_frames=n, generated_frames=n, rendered_resolution=RESOLUTION,
              model_resolution=list(model_hw), seeds=f"{seeds.start}:{seeds.stop}", paper=PAPER)


def table_rows(summary: Mapping[str, Any], lpips_weights: Any = None) -> list[dict[str, Any]]:
  """Rows of the protocol's table from a ``revisit.summarize`` summary, then the anchors.

  ``lpips_weights``: metrics.json's ``lpips`` (None: not scored, and our rows' ``lpips``
  cells say so; the anchors keep the paper's figure).
  """
  rows = []
  for name, s in summary.items():
    if not isinstance(s, dict) or "psnr_all" not in s:
      continue
    rows.append(dict(row=LABELS.get(name, name), psnr_all=s.get("psnr_all"),
                     ssim_all=s.get("ssim_all"), lpips=s.get("lpips_all"),
                     psnr_revisit=s.get("psnr_revisit"), coverage_revisit=s.get("coverage_revisit")))
  return lpips.table_rows(rows, COLUMNS, lpips_weights) + [dict(a) for a in ANCHORS]


def format_table(metrics: Mapping[str, Any]) -> str:
  """The table of an ``evaluate --benchmark=memory_maze`` metrics.json, anchors included.

  Our rows score N generated frames after N given at the protocol's resolution; the
  anchors are the paper's (400 + 400). ``psnr_all``/``ssim_all``/``lpips``: means over the
  generated frames; ``psnr_revisit``: over generated frames that revisit an earlier view.
  """
  result = metrics[GROUP]
  p = metrics.get("protocol", {})
  head = (f"Memory Maze protocol: {len(result['trajectories'])} held-out mazes "
          f"(seeds {p.get('seeds', '?')}), {p.get('given_frames', '?')} frames given, "
          f"{p.get('generated_frames', '?')} generated and scored, rendered at "
          f"{p.get('rendered_resolution', '?')}x{p.get('rendered_resolution', '?')}; "
          f"the paper: {PAPER['context']} given, {PAPER['generated']} generated at 64x64. "
          + _lpips_note(metrics.get("lpips")))
  return head + "\n" + report.format_table(table_rows(result["summary"], metrics.get("lpips")),
                                           COLUMNS, ".3f")


def _lpips_note(weights: Mapping[str, Any] | None) -> str:
  if not weights:
    return "LPIPS: not scored (no pretrained weights given: --lpips_backbone)."
  return f"LPIPS: v{weights.get('version', '0.1')} {weights.get('net', '?')}."
