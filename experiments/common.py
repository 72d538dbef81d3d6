"""Fields every experiment config shares; each experiment file overrides the sizes.

Every field the training code reads is set here, so nothing hides in code defaults and every
one can be overridden on the command line (``--config.train.steps=100``).
"""

from __future__ import annotations

import ml_collections

from data_pipelines import pipeline
from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.models import autoencoder, denoiser

STAGES = ("autoencoder", "denoiser")


def base_config(stage: str | None) -> ml_collections.ConfigDict:
  """Shared defaults; ``stage`` is the ``--config=file.py:<stage>`` argument (default: autoencoder)."""
  stage = stage or "autoencoder"
  if stage not in STAGES:
    raise ValueError(f"config argument must be one of {STAGES}, got {stage!r}")
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  # JAX's persistent compilation cache: a restarted or resumed run (or another process of
  # the same job) loads its compiled steps instead of compiling again; '' = off.
  # $JAX_COMPILATION_CACHE_DIR, when set, wins (the test suite uses it).
  c.compilation_cache_dir = "~/.cache/mirage_jax/xla"

  # Mesh (ICI, within a slice; one axis may be -1) x DCN (slices per axis; all 1 = one slice).
  c.mesh = dict(data=1, fsdp=-1, context=1, tensor=1)
  c.dcn_mesh = dict(data=1, fsdp=1, context=1, tensor=1)
  c.logical_rules = sharding.DEFAULT_LOGICAL_RULES

  c.data = pipeline.default_config()
  c.data.dataset = "procedural_rooms"
  c.data.data_dir = "data"
  c.data.config_name = "default"
  # Frames cross to the device as uint8 (a quarter of float32's bytes) and become [-1, 1]
  # floats inside the jitted step (train.model_inputs).
  c.data.frames_dtype = "uint8"
  c.data.build = ml_collections.ConfigDict(dict(num_clips=32, frames_per_clip=32, resolution=64,
                                                moving_objects=2))

  c.autoencoder = autoencoder.autoencoder_config("tiny")
  c.denoiser = ml_collections.ConfigDict()
  c.denoiser.model = denoiser.denoiser_config("tiny")
  c.denoiser.autoencoder_checkpoint = ""  # a stage-1 export (python -m mirage_jax.export)
  c.denoiser.memory_frames = 4  # earlier frames written into memory
  c.denoiser.context_frames = 2  # last memory frames also given clean (t = 0)
  c.denoiser.target_frames = 4  # the chunk the loss is on
  # Retrieved reference frames, put before the last context_frames in the clean context
  # (the reference uses 4): earlier frames picked by voxel IoU with the target cameras'
  # visible points (rollout.retrieve_references); 0 = off. Training retrieves among the
  # memory frames, so reference_frames <= memory_frames.
  c.denoiser.reference_frames = 0
  c.denoiser.reference_bank = 16  # rollout: ring buffer of past latent frames retrieved from
  c.denoiser.reference_stride = 1  # rollout: bank every Nth frame of each chunk
  c.denoiser.latent_scale = 1.0
  c.denoiser.time_shift = 1.0
  c.denoiser.time_weighting = "uniform"
  c.denoiser.prediction = "velocity"  # 'velocity' (the reference) | 'x0_prior' (see denoiser.predict)
  # Probability that a training example sees no memory (read and coverage zeroed): the
  # unconditional branch of classifier-free guidance. 0 = never, and then generate/evaluate
  # refuse sampler.guidance_scale > 0 (this family samples without guidance).
  c.denoiser.cond_dropout = 0.0

  # Sampler of the rollout: euler | heun | unipc (the reference: FlowUniPC, order 2, 20 steps,
  # shift 5, no guidance; experiments/wan22_ti2v_5b.py uses it).  The small family samples
  # with Euler, as it was trained and measured.
  c.sampler = ml_collections.ConfigDict(dict(num_steps=20, method="euler", shift=5.0,
                                             guidance_scale=0.0))
  # Small family's rollout: each chunk's sampled latents are decoded and encoded again before
  # they become the next chunk's context and are written to memory (what the model saw in
  # training: encoder latents); the frames shown are the first decoding.
  c.sampler.reencode_latents = False

  c.memory = ml_collections.ConfigDict()
  c.memory.backend = "voxel"
  # Backends whose rollout writes generated frames only where the memory read was empty:
  # covered cells were copied from memory, so writing them back only adds drift (ours;
  # the reference's `mirage` writes everything).
  c.memory.write_new_only = ("voxel",)
  # Backends (only 'voxel' reads depth) whose rollout takes the depth it writes from the
  # memory read where it covers, and, with depth_from_memory_rescale, scales the generated
  # depth elsewhere by the frame's median memory / generated ratio (rollout.anchor_depth):
  # newly seen content is written at the memory's scale instead of the drifting generated one.
  c.memory.depth_from_memory = ()
  c.memory.depth_from_memory_rescale = True
  # Backends whose rollout keeps cells the autoencoder's dynamic head marks as moving out of
  # the memory (ours; the reference's `mirage` writes generated moving content too).
  c.memory.mask_dynamic = ("voxel",)
  # Probability from which the dynamic head's cell counts as moving. A missed moving cell
  # leaves a ghost, a wrong one only a hole: on held-out loops 0.3 gave +0.26 dB where objects
  # had stood and no loss on static loops vs 0.5 (BENCHMARKS.md).
  c.memory.dynamic_threshold = 0.3
  c.memory.settings = ml_collections.ConfigDict(dict(
      capacity=4096, feature_dtype="bfloat16", voxel_size=0.05, recency_decay=0.5,
      splat_radius=1, near=1e-3, depth_tolerance=0.2))
  # Training memory slots; 0 = what one window writes (its memory frames' points), at most
  # settings.capacity (the rollout's, sized for whole trajectories).
  c.memory.train_capacity = 0

  # Object slots (mirage_jax/memory/objects.py): moving content carried per object, splatted
  # over the memory read. Rollouts of these backends use them, and a denoiser trained with
  # config.memory.backend among them sees the slots (from the memory frames' ground-truth
  # masks) in its conditioning, as the rollout will show them.
  c.objects = ml_collections.ConfigDict()
  c.objects.backends = ("voxel",)
  c.objects.settings = ml_collections.ConfigDict(dict(
      slots=8, patch=4, max_detections=4, min_cells=1, match_distance=1.0,
      velocity_smoothing=0.5, velocity_horizon=8.0, max_unseen=96, miss_limit=2, near=1e-3))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=100, b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.01, grad_clip_norm=1.0, ema_decay=0.999,
      ema_warmup=True))  # EMA decay min(ema_decay, (1 + t) / (10 + t)) at step t

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=50,
      nonfinite="skip",  # 'skip': leave the state unchanged and go on; 'halt': raise
      tensorboard=True,
      peak_tflops_per_device=0.0,  # 0 = from the device kind (CPU: measured matmul)
      profile_start=10, profile_steps=0,  # jax.profiler trace of these steps (0 = off)
      prefetch=2,  # global batches placed on the mesh ahead of the step (0 = none)
      # A train step serialised by `python -m mirage_jax.aot --save_executable=FILE` for
      # this config and mesh, loaded instead of compiling ('' = compile here).
      executable="",
      microbatches=1,  # gradient accumulation: the global batch in this many scanned pieces
      # Flow times of a chunk's target frames: 'per_frame' (independent), 'per_example' (one
      # level for the chunk, as the sampler moves them) or 'mixed' (per example with
      # probability noise_levels_mixed_prob).
      noise_levels="per_frame", noise_levels_mixed_prob=0.5))

  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.eval = ml_collections.ConfigDict(dict(
      every=0, batches=2,  # every 0 = no evals
      # Held-out revisit rollouts of the EMA weights at every eval (the denoiser stage of
      # either family; evaluation/training_rollouts.py): trajectories (0 = off), frames
      # each (more than one chunk), the first
      # procedural loop seed (held out of datasets built from seed 0), backends (() = the
      # trained memory.backend).
      rollouts=0, rollout_frames=24, rollout_seed=100_000, rollout_backends=()))
  return c


def memory_baseline(c: ml_collections.ConfigDict, backend: str) -> ml_collections.ConfigDict:
  """A copy of denoiser config ``c`` trained with memory backend ``backend`` instead.

  Everything else (data, steps, optimiser, sampler, autoencoder) stays, so a baseline is
  trained for its job as the memory model is for its own (``main_job --train_baselines``).
  ``none``: the memory read is empty (zeros, coverage 0), so the denoiser learns from the
  clean context and rays alone; ``frame_bank``: the past frame of most view overlap,
  reprojected into the target cameras, with no 3D cache.
  """
  from mirage_jax import memory  # pylint: disable=g-import-not-at-top
  if backend not in memory.BACKEND_NAMES:
    raise InputError("config.memory", "backend", f"unknown backend {backend!r} (known: "
                     f"{', '.join(memory.BACKEND_NAMES)})")
  out = c.copy_and_resolve_references()
  out.memory.backend = backend
  return out


def set_window(c: ml_collections.ConfigDict) -> None:
  """Window length of the denoiser stage: memory + target frames (autoencoder: as configured)."""
  if c.stage == "denoiser":
    c.data.num_frames = c.denoiser.memory_frames + c.denoiser.target_frames


def parse_stage_variant(arg: str | None, default_stage: str, default_variant: str,
                        variants) -> tuple[str, str]:
  """A config file's ``'<stage>[,<variant>]'`` argument -> (stage, variant)."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  stage = parts[0] if parts else default_stage
  variant = parts[1] if len(parts) > 1 else default_variant
  if stage not in STAGES or variant not in variants or len(parts) > 2:
    raise ValueError(f"config argument must be '<stage>[,<variant>]' with stage in "
                     f"{STAGES} and variant in {variants}, got {arg!r}")
  return stage, variant
