"""Wan VAE training stage on this CPU: seconds per step, and held-out PSNR over training.

  python -m benchmarks.bench_wan_vae_train --part=step [--steps=3]
  python -m benchmarks.bench_wan_vae_train --part=psnr --workdir=/tmp/vae_psnr \
      [--resolution=64 --frames=5 --batch=2 --train_steps=300 --every=50]

``step``: the tiny variant (experiments/wan22_pretrain.py:autoencoder,tiny) at 64x64 and
128x128, 5 and 9 frames, batch 1, 2 and 4: the jitted train step on one CPU device
(random uint8 frames, no input pipeline), best of ``--steps`` after a warm-up, and the
compile time. ``psnr``: trains the tiny variant with the real loop on built procedural rooms
(``--workdir``/data, built if absent), a checkpoint every ``--every`` steps, then the held-out
PSNR (encode -> decode, the inference path) of each checkpoint's raw params on 8 procedural
clips of seeds no built clip has. One JSON line per case.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_PART = flags.DEFINE_enum("part", "step", ["step", "psnr"], "What to measure.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per case (after one warm-up).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/wan_vae_psnr", "psnr: run folder.")
_RES = flags.DEFINE_integer("resolution", 64, "psnr: clip height = width.")
_FRAMES = flags.DEFINE_integer("frames", 5, "psnr: frames per clip (1 + 4k).")
_BATCH = flags.DEFINE_integer("batch", 2, "psnr: clips per step.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 300, "psnr: training steps.")
_EVERY = flags.DEFINE_integer("every", 50, "psnr: steps between evaluated checkpoints.")
_CASES = flags.DEFINE_list("cases", [f"{r}x{f}x{b}" for r in (64, 128) for f in (5, 9)
                                      for b in (1, 2, 4)],
                           "step: RESxFRAMESxBATCH cases.")


def _config(res: int, frames: int, batch: int):
  from experiments import wan22_pretrain  # pylint: disable=g-import-not-at-top
  c = wan22_pretrain.get_config("autoencoder,tiny")
  c.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)  # this process's devices (1 CPU)
  c.data.update(resolution=(res, res), num_frames=frames, batch_size=batch)
  return c


def _step_times() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mirage_jax.training import mesh as mesh_lib
  from mirage_jax.training import step as step_lib
  from mirage_jax.training.inputs import abstract_batch
  for case in _CASES.value:
    res, frames, batch = (int(v) for v in case.split("x"))
    config = _config(res, frames, batch)
    stage = step_lib.make_stage(config)
    mesh = mesh_lib.build_mesh(config)
    setup = step_lib.make_setup(config, stage, mesh)
    specs = abstract_batch(config, stage, mesh, setup.rules)
    fn = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
    rng = np.random.default_rng(0)
    data = {"frames": jax.device_put(rng.integers(0, 256, specs["frames"].shape, np.uint8),
                                     specs["frames"].sharding)}
    with setup.context():
      state = step_lib.init_state(config, stage, setup)
      t0 = time.perf_counter()
      compiled = fn.lower(state, data, {}).compile()
      compile_s = time.perf_counter() - t0
      state, m = compiled(state, data, {})
      jax.block_until_ready(m)
      best = float("inf")
      for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, m = compiled(state, data, {})
        jax.block_until_ready(m)
        best = min(best, time.perf_counter() - t0)
    print(json.dumps(dict(resolution=res, frames=frames, batch=batch, step_s=round(best, 3),
                          clips_per_s=round(batch / best, 2), compile_s=round(compile_s, 1),
                          gflop_per_step=round(stage.step_flops(batch) / 1e9, 1))), flush=True)


def _psnr_curve() -> None:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np
  from data_pipelines import build, pipeline
  from data_pipelines.procedural import render_clip
  from mirage_jax import checkpoint
  from mirage_jax.families.wan import vae as wan_vae
  from mirage_jax.training import loop as loop_lib
  res, frames = _RES.value, _FRAMES.value
  config = _config(res, frames, _BATCH.value)
  root = _WORKDIR.value
  config.data.data_dir = os.path.join(root, "data")
  config.data.build.update(resolution=res)
  config.train.update(steps=_TRAIN_STEPS.value, log_every=_EVERY.value)
  config.checkpoint.update(every=_EVERY.value, keep=1000, async_save=False)
  t0 = time.perf_counter()
  build.build("procedural_rooms", config.data.data_dir, **config.data.build.to_dict())
  build_s = time.perf_counter() - t0
  work = os.path.join(root, f"run_{res}_{frames}_{_BATCH.value}")
  t0 = time.perf_counter()
  loop_lib.train_and_evaluate(config, work)
  train_s = time.perf_counter() - t0
  video = pipeline.frames_to_float(np.stack([
      render_clip(100_000 + i, frames, res, res, trajectory="random")["frames"]
      for i in range(8)]))

  def psnr(vae) -> float:
    recon = np.asarray(wan_vae.jit_decode(vae, wan_vae.jit_encode(vae, jnp.asarray(video))))
    mse = np.mean((recon - video) ** 2, axis=(1, 2, 3, 4))
    return float(np.mean(10 * np.log10(4.0 / mse)))

  from flax import nnx  # pylint: disable=g-import-not-at-top
  init = wan_vae.WanVAE(config.autoencoder, rngs=nnx.Rngs(config.seed))
  rows = [dict(step=0, psnr=round(psnr(init), 2))]
  with open(os.path.join(work, "metrics.jsonl")) as f:
    logged = {r["step"]: r for r in map(json.loads, f)}
  for step in range(_EVERY.value, _TRAIN_STEPS.value + 1, _EVERY.value):
    out = os.path.join(work, f"export_{step}")
    if not os.path.exists(out):
      checkpoint.export_params(work, out, use_ema=False, step=step)
    vae, _ = wan_vae.load_export(out)
    r = logged.get(step, {})
    rows.append(dict(step=step, psnr=round(psnr(vae), 2), train_l1=r.get("l1"),
                     train_psnr=r.get("psnr"), latent_std=r.get("latent_std"),
                     step_time_s=r.get("step_time_s")))
  for r in rows:
    print(json.dumps(r), flush=True)
  print(json.dumps(dict(resolution=res, frames=frames, batch=_BATCH.value,
                        steps=_TRAIN_STEPS.value, build_s=round(build_s, 1),
                        train_s=round(train_s, 1))), flush=True)


def main(argv) -> None:
  del argv
  _step_times() if _PART.value == "step" else _psnr_curve()


if __name__ == "__main__":
  app.run(main)
