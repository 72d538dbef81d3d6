"""A tiny Depth Anything V2 trained to metric depth on a CPU (``config.stage = 'depth'``).

  --config=experiments/depth_tiny_cpu.py[:<data>]

``<data>`` names the dataset the frames and depths come from (the same built dataset as the
family's own tiny config, so one ``data_pipelines.build`` serves both):

  * 'procedural' (default): ``experiments/tiny_cpu.py``'s procedural rooms, 32x32 frames,
    resized to the network's 56x56 input (4x4 patches of 14);
  * 'wan': ``experiments/wan_tiny_cpu.py``'s procedural rooms, 128x128 frames, 112x112
    input (8x8 patches).

  python -m mirage_jax.main --config=experiments/depth_tiny_cpu.py --workdir=runs/depth_tiny
  python -m mirage_jax.export --workdir=runs/depth_tiny --output=runs/depth_tiny_export

The export loads with ``mirage_jax.depth.depth_anything.load_export``. The stage
(``mirage_jax.depth.stage``) reads ``depth_model``, ``depth_train``, and the trainer's
fields (data, mesh, optimizer with EMA, train, checkpoint, eval); nothing of a family.
"""

from __future__ import annotations

from experiments import common
from experiments import tiny_cpu
from experiments import wan_tiny_cpu
from mirage_jax.depth import depth_anything

DATA = ("procedural", "wan")
# Fields of common.base_config that belong to a family's models: a depth run has none.
_FAMILY_FIELDS = ("family", "autoencoder", "denoiser", "sampler", "memory", "objects")


def get_config(arg=None):
  data = (arg or "procedural").strip()
  if data not in DATA:
    raise ValueError(f"config argument must be one of {DATA}, got {arg!r}")
  if data == "procedural":
    src, input_size, batch_size = tiny_cpu.get_config("autoencoder"), 56, 16
  else:
    src, input_size, batch_size = wan_tiny_cpu.get_config("autoencoder"), 112, 4
  c = common.base_config("autoencoder")
  for field in _FAMILY_FIELDS:
    del c[field]
  c.stage = "depth"
  # The dataset as the family's tiny config builds it (same path, same params), read as
  # single frames at the built resolution.
  c.data.update(dataset=src.data.dataset, data_dir=src.data.data_dir,
                config_name=src.data.config_name)
  c.data.build = src.data.build
  res = int(src.data.build.resolution)
  c.data.update(resolution=(res, res), num_frames=1, stride=1, batch_size=batch_size,
                crop="center", read_threads=1)
  # max_depth 20: the released indoor metric models' (the rooms' depths stay under 14 m).
  c.depth_model = depth_anything.model_config("tiny", "metric", max_depth=20.0,
                                              input_size=input_size)
  c.depth_train = dict(silog_lambda=0.5, dtype="float32", param_dtype="float32")
  c.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=50,
                     weight_decay=0.01, ema_decay=0.99)
  c.train.update(steps=2000 if data == "procedural" else 600, log_every=50, tensorboard=False)
  c.checkpoint.update(every=250, keep=2)
  c.eval.update(every=250, batches=2)
  return c
