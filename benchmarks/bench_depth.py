"""Held-out error of a trained depth export (``config.stage = 'depth'``) on its dataset.

  python -m benchmarks.bench_depth --export=runs/depth_tiny_export [--split=validation]

Loads the export with ``depth_anything.load_export``, reads every frame of every clip of
``--split`` of the dataset its config names (``config.data``, built beforehand), estimates
depth with ``depth_anything.estimate`` (the inference path) and prints one JSON line: the
abs-rel ``mean |d - d*| / d*`` over all valid pixels (``stage.valid_pixels``), raw and
after scaling each frame's prediction by median(d*) / median(d), plus the counts.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags

_EXPORT = flags.DEFINE_string("export", None, "Depth export directory.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"],
                           "Dataset split.")
_BATCH = flags.DEFINE_integer("batch", 48, "Frames per estimate call.")


def measure(export: str, split: str = "validation", batch: int = 48) -> dict:
  """The JSON record (module docstring) of ``export`` on ``split``."""
  # pylint: disable=g-import-not-at-top
  from data_pipelines import builders, pipeline
  from mirage_jax import checkpoint
  from mirage_jax.depth import depth_anything, stage
  # pylint: enable=g-import-not-at-top
  model, cfg = depth_anything.load_export(export)
  d = checkpoint.export_config(export).data
  builder = builders.make_builder(d.dataset, d.data_dir, d.config_name, **d.build.to_dict())
  source = builder.as_data_source(split)

  @jax.jit
  def errors(frames, depths):
    pred = depth_anything.estimate(model, pipeline.frames_to_float(frames))
    valid = stage.valid_pixels(depths, cfg.max_depth)
    raw, aligned = stage.abs_rel(pred, depths, valid)
    return raw, aligned, valid.sum()

  frames = np.concatenate([source[i]["frames"] for i in range(len(source))])
  depths = np.concatenate([source[i]["depths"] for i in range(len(source))])
  if tuple(frames.shape[1:3]) != tuple(d.resolution):
    raise ValueError(f"frames of {frames.shape[1:3]} but config.data.resolution "
                     f"{tuple(d.resolution)}: compare at the trained resolution")
  total = np.zeros(3)
  n = len(frames) - len(frames) % batch  # whole batches: one compiled shape
  for i in range(0, n, batch):
    total += np.array(jax.device_get(errors(frames[i:i + batch], depths[i:i + batch])),
                      np.float64)
  if n < len(frames):
    total += np.array(jax.device_get(errors(frames[n:], depths[n:])), np.float64)
  return {"export": export, "split": split, "clips": len(source), "frames": len(frames),
          "valid_pixels": int(total[2]), "abs_rel": total[0] / total[2],
          "abs_rel_median_aligned": total[1] / total[2]}


def main(argv) -> None:
  del argv
  print(json.dumps(measure(_EXPORT.value, _SPLIT.value, _BATCH.value)))


if __name__ == "__main__":
  flags.mark_flag_as_required("export")
  app.run(main)
