"""Training-time rollouts: the revisit benchmark on a few held-out loops, during training.

Every ``config.eval.every`` steps ``training.loop.train_and_evaluate`` hands the current EMA weights
to :class:`TrainingRollouts`, which generates ``config.eval.rollouts`` held-out procedural
loop trajectories (seeds ``config.eval.rollout_seed`` onwards, ``config.eval.rollout_frames``
frames, rendered once) with each backend of ``config.eval.rollout_backends`` (default: the
trained one), scores them as ``evaluate --benchmark=revisit`` does (``revisit.RevisitRunner``,
no oracle or composite rows) and returns:

  scalars  ``rollout/<backend>/<score>``: psnr_revisit, ssim_revisit, psnr_all, ssim_all,
           means over the trajectories;
  videos   ``rollout/<backend>/<trajectory>``: generated | ground truth | memory coverage,
           uint8 (T, H, W', 3), upscaled to at least 64 pixels high.

Both families. The small family generates with the EMA denoiser on the frozen
autoencoder; the Wan family (``families.wan.stages.WanStage``) with the EMA of the trained VACE/LoRA params
over the frozen base DiT (the reference keeps no EMA: ``ema_decay`` 0 makes it the params),
decoded by the Wan VAE of ``config.denoiser.autoencoder_checkpoint`` (else the one the base
export names), writing each latent with the loop's given depth, sampled with the empty
prompt (the Wan family's ``WorldModel``). Every trajectory's rollout is one batched chunk step
per chunk (``generate_batch``).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from mirage_jax import families
from mirage_jax.errors import InputError

SCORES = ("psnr_revisit", "ssim_revisit", "psnr_all", "ssim_all")


def check_config(config: ml_collections.ConfigDict) -> int:
  """Number of trajectories (0 = off); refuses settings it cannot run."""
  e = config.eval
  n = int(e.get("rollouts", 0))
  if n <= 0:
    return 0
  from mirage_jax import memory  # pylint: disable=g-import-not-at-top
  if config.stage != "denoiser":
    raise InputError("config.eval", "rollouts", "training-time rollouts run for the "
                     f"denoiser stage only (this is {config.stage!r}); set config.eval.rollouts=0")
  if int(e.rollout_frames) <= int(config.denoiser.target_frames):
    raise InputError("config.eval", "rollout_frames", f"must exceed one chunk "
                     f"({config.denoiser.target_frames} frames), got {e.rollout_frames}")
  unknown = [b for b in e.rollout_backends if b not in memory.BACKEND_NAMES]
  if unknown:
    raise InputError("config.eval", "rollout_backends", f"unknown {unknown[0]!r} (known: "
                     f"{', '.join(memory.BACKEND_NAMES)})")
  return n


class TrainingRollouts:
  """Held-out loops rendered once; :meth:`__call__` scores a model on them."""

  def __init__(self, config: ml_collections.ConfigDict):
    from data_pipelines import procedural  # pylint: disable=g-import-not-at-top
    from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
    self.config = config
    n = check_config(config)
    e = config.eval
    h, w = (int(r) for r in config.data.resolution)
    self.backends = list(e.rollout_backends) or [config.memory.backend]
    self.trajectories = []
    # The Wan family trains on latents: its rollouts need the VAE (loaded once).
    self.vae = None
    self.vae = families.world_model(config).frozen_autoencoder(config)
    for seed in range(int(e.rollout_seed), int(e.rollout_seed) + n):
      clip = procedural.render_clip(seed, int(e.rollout_frames), h, w, trajectory="loop")
      self.trajectories.append(revisit.Trajectory(name=f"seed{seed}", fps=float(clip["fps"]),
                                                  **revisit.fit_clip(clip, (h, w))))

  def __call__(self, ae: nnx.Module | None, dn: nnx.Module, sampling_options: dict | None = None
               ) -> tuple[dict[str, float], dict[str, Any]]:
    """Scores ``dn`` (on the frozen ``ae``; None: the Wan VAE loaded here) and returns
    (scalars, videos), see the module doc. ``sampling_options``: ``WanRollout``'s text options
    (e.g. the run's empty-prompt embedding)."""
    from mirage_jax.evaluation import revisit, video  # pylint: disable=g-import-not-at-top
    # A runner per call: it holds the weights it was built with (compiles hit JAX's caches).
    runner = revisit.RevisitRunner(self.config, self.vae if ae is None else ae, dn,
                                   self.backends, max(len(t.frames) for t in self.trajectories),
                                   oracle=False, composite=False, sampling_options=sampling_options)
    results, videos = {}, {}
    # All trajectories at once: one jitted chunk step for the batch (revisit.run_batch).
    for t, (res, outputs) in zip(self.trajectories, runner.run_batch(
        self.trajectories, seed=0, return_outputs=True)):
      results[t.name] = res
      for row, out in outputs.items():
        panel = revisit.panel(t, out["frames"], out["coverage"])
        videos[f"rollout/{row}/{t.name}"] = video.upscale(panel, max(1, 64 // t.frames.shape[1]))
    summary, _ = revisit.summarize(results)
    scalars = {f"rollout/{row}/{k}": float(summary[row][k]) for row in self.backends
               for k in SCORES if np.isfinite(summary[row].get(k, np.nan))}
    return scalars, videos
