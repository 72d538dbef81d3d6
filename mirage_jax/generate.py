"""Generates a video along a posed clip's camera path, from its first frame and depth.

  python -m mirage_jax.generate --checkpoint=runs/tiny_dit_export \\
      --geometry_path=clip/geometry.npz --output_dir=out/clip [--memory=voxel] [--num_frames=N] \\
      [--[no]mask_dynamic] [--[no]object_slots]

The input is the reference's ``geometry.npz`` (read by ``files.load_inference_geometry``;
made from a built dataset's clip or from your own frames, depth and cameras by ``python -m
data_pipelines.make_geometry``): only frame 0 (RGB + depth) and every frame's camera are used
(the Wan family: every frame's depth too), so the file may hold frame 0 alone (in the file,
or ``first_frame.png`` / ``clip.mp4`` beside it) with every camera. A file without the depth
a family needs is refused in one line. Frame 0 and the intrinsics are resized to cover the
model's resolution and centre-cropped (the input pipeline's resize).

The export's config picks the model family (``config.family``, read by ``mirage_jax.families``):

* small (ours, RGB-D autoencoder): as above; the memory is written with generated depth.
* wan (Wan2.2 DiT + VACE + Wan VAE, ``python -m mirage_jax.convert_wan``; the rollout is
  ``mirage_jax/families/wan/world_model.py``): chunks of 33 then 32 new video frames, FlowUniPC (20 steps,
  shift 5) without CFG unless ``--guidance_scale`` > 0. The Wan VAE decodes RGB only, so
  each new latent is written into the memory either with the file's depth of its video frame
  (``--depth_estimator=given``, the default: a file without every frame's depth is refused)
  or with the depth a Depth Anything V2 export estimates from the decoded frame inside the
  chunk step, aligned to the memory (``--depth_model=<export>``; the reference estimates with
  MapAnything). With a metric depth model frame 0's depth is optional too.
  The text: ``--prompt`` (or ``--prompt_file``, a UTF-8 file of one line), encoded by the
  umT5 export ``--text_encoder`` (``python -m mirage_jax.convert_text``) with its tokenizer
  folder ``--tokenizer`` (both default to the export's ``denoiser.text_encoder`` /
  ``denoiser.tokenizer``, which ``convert_wan --text_encoder --tokenizer`` stores), or
  ``--caption_embedding``, a saved umT5 embedding ``.npy`` of shape (Lt <= 512, text_dim).
  Without either, the empty prompt: ``--empty_text_embedding`` (the same shape), else the
  export's ``empty_text.npy``, else umT5 of "" by the known encoder (zeros, with a warning,
  only when none is known). The CFG negative is ``--negative_prompt``, else the empty prompt
  (the reference's).

      python -m mirage_jax.generate --checkpoint=runs/wan_export/dit \\
          --geometry_path=clip/geometry.npz --output_dir=out/wan --memory=mirage \\
          [--prompt="a camera walks through a sunlit kitchen"] [--guidance_scale=5] \\
          [--negative_prompt=TEXT] [--text_encoder=runs/umt5_xxl --tokenizer=google/umt5-xxl]

Outputs in ``--output_dir`` (refused if it exists and is not empty, unless ``--overwrite``;
every file written under a temporary name, then renamed; with several processes, the flags
of ``mirage_jax.main``, every process generates the same frames and process 0 alone writes
them while the others wait):

  video.mp4, video.gif   the generated frames (frame 0 is the autoencoded first frame);
  depth.npz              ``depths (T, H, W)`` generated z-depth, ``intrinsics (T, 3, 3)`` at
                         the model's resolution, ``poses_c2w (T, 4, 4)`` (small family);
  depth.mp4              the depth, colour-mapped with one range for the whole clip (small);
  objects.npz            ``dynamic (T, h, w)`` the dynamic head's probability that a latent
                         cell moves, ``object_positions (T, S, 3)`` and ``object_idents
                         (T, S)`` (-1 = empty) of the object slots at each frame (S = 0
                         without slots) (small);
  cameras.npz            (wan, which decodes no depth) ``intrinsics (T, 3, 3)``,
                         ``poses_c2w (T, 4, 4)``, ``latent_frames (L,)`` the video frame each
                         latent written into the memory stands for, ``coverage (T, h, w)``;
                         with a depth model also ``latent_depths (L, H, W)`` the depth each
                         was written with, ``depth_aligned (L,)`` those fitted to the memory;
  timings.json           per chunk: memory seconds (read + write), whole-chunk seconds, cache
                         bytes after it; totals. The first chunk includes compilation.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
from absl import flags

from mirage_jax import depth, distributed, paths
from mirage_jax.errors import InputError, run_app

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Denoiser export (python -m mirage_jax.export).")
_AUTOENCODER = flags.DEFINE_string("autoencoder", None,
                                   "Autoencoder export (default: the one the denoiser was trained with).")
_GEOMETRY = flags.DEFINE_string("geometry_path", None, "geometry.npz with frame 0, depth and the cameras.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the outputs go.")
_MEMORY = flags.DEFINE_string("memory", None, "Memory backend (default: the training config's).")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", None, "Frames to generate along (default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MASK_DYNAMIC = flags.DEFINE_bool("mask_dynamic", None, "Keep predicted moving content out of the "
                                  "static memory (default: config.memory.mask_dynamic).")
_OBJECT_SLOTS = flags.DEFINE_bool("object_slots", None, "Carry moving content in object slots "
                                  "(default: config.objects.backends).")
_FPS = flags.DEFINE_float("fps", None, "Video frame rate (default: the file's fps).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the outputs in a non-empty --output_dir.")
# Wan family only.
_CAPTION = flags.DEFINE_string("caption_embedding", None, "Wan: the caption's umT5 embedding, "
                               ".npy (Lt <= 512, text_dim) (default: the empty prompt).")
_EMPTY_TEXT = flags.DEFINE_string("empty_text_embedding", None, "Wan: the empty prompt's umT5 "
                                  "embedding, .npy (Lt <= 512, text_dim) (default: the export's "
                                  "empty_text.npy, else umT5 of \"\" by the text encoder).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Wan: classifier-free guidance scale "
                               "(negative prompt: the empty one; default: config.sampler, 0 = off).")
_PROMPT = flags.DEFINE_string("prompt", None, "Wan: the text prompt (encoded by the umT5 "
                              "--text_encoder; default: the empty prompt).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Wan: a UTF-8 file holding the prompt "
                                   "on one line (instead of --prompt).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Wan: the CFG negative prompt "
                                "(default: the empty prompt, as the reference).")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "Wan: umT5 export (python -m "
                                    "mirage_jax.convert_text) (default: the export's "
                                    "denoiser.text_encoder).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Wan: the umT5 tokenizer folder "
                                 "(google/umt5-xxl; default: the export's denoiser.tokenizer).")
_DEPTH_OPTIONS = depth.define_flags()
_INIT_DISTRIBUTED = distributed.define_flags()


def check_text_files(*flag_values) -> None:
  """Refuses a missing embedding file before the model is loaded (seconds)."""
  for flag in flag_values:
    if flag.value is not None and not os.path.isfile(flag.value):
      raise InputError(flag.value, flag.name, "no such file (a .npy of shape (Lt, text_dim))")


def prompt_options(prompt, prompt_file, negative, text_encoder, tokenizer, caption) -> dict:
  """The prompt flags (absl flag holders) as ``sampling_options`` keywords, checked before
  anything loads (``prompts.command_line_prompt``)."""
  from mirage_jax.text import prompts  # pylint: disable=g-import-not-at-top
  text = prompts.command_line_prompt(prompt.value, prompt_file.value, caption.value)
  return dict(prompt=text, negative_prompt=negative.value, text_encoder=text_encoder.value,
              tokenizer=tokenizer.value)


def _main() -> int:
  # numpy and the video reader beside the .npz read local files.
  for flag in (_GEOMETRY, _CAPTION, _EMPTY_TEXT):
    paths.require_local(flag.value, f"--{flag.name}", "copy it to a local disk first")
  for flag, value in (("--checkpoint", _CHECKPOINT.value), ("--geometry_path", _GEOMETRY.value)):
    if not value:
      raise InputError(flag, flag[2:], "required")
  if _NUM_FRAMES.value is not None and _NUM_FRAMES.value < 2:
    raise InputError("--num_frames", "num_frames", f"need at least 2, got {_NUM_FRAMES.value}")
  _INIT_DISTRIBUTED()
  # Imports after the flag checks: JAX and the models take seconds to load.
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines import files  # pylint: disable=g-import-not-at-top
  from mirage_jax import checkpoint, families, memory, rollout  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import inference_inputs, report, revisit, video  # pylint: disable=g-import-not-at-top

  if _MEMORY.value is not None and _MEMORY.value not in memory.BACKEND_NAMES:
    raise InputError("--memory", "memory", f"unknown backend {_MEMORY.value!r} (known: "
                     f"{', '.join(memory.BACKEND_NAMES)})")
  check_text_files(_CAPTION, _EMPTY_TEXT)
  text = prompt_options(_PROMPT, _PROMPT_FILE, _NEGATIVE, _TEXT_ENCODER, _TOKENIZER, _CAPTION)
  paths.check_reachable(_CHECKPOINT.value, "--checkpoint")
  paths.check_reachable(_OUTPUT.value, "--output_dir")
  geo = files.load_inference_geometry(_GEOMETRY.value)
  config = families.upgrade(checkpoint.export_config(_CHECKPOINT.value))
  wm = families.world_model(config)
  if len(geo["poses_c2w"]) < 2:
    raise InputError(_GEOMETRY.value, "poses_c2w", "need at least 2 cameras to generate along")
  depth_opts = _DEPTH_OPTIONS(wm)
  if depth_opts.model:
    paths.check_reachable(depth_opts.model, "--depth_model")
  inference_inputs.require_depth(_GEOMETRY.value, geo, config.family,
                                 needs_every=depth_opts.estimator == "given",
                                 needs_first=depth_opts.estimator != "depth_anything")
  # Prompts are encoded here, before the world model loads (the umT5 encoder is then freed).
  options = wm.sampling_options(config, caption=_CAPTION.value, empty_text=_EMPTY_TEXT.value,
                                guidance_scale=_GUIDANCE.value, **text)
  def claim(stack: contextlib.ExitStack) -> str:
    # A gs:// --output_dir is written locally, then uploaded when ``stack`` closes.
    directory = stack.enter_context(paths.staged_dir(_OUTPUT.value, "--output_dir",
                                                     _OVERWRITE.value))
    revisit.prepare_output_dir(directory, _OVERWRITE.value)
    return directory

  with contextlib.ExitStack() as staged:
    directory = distributed.on_process_zero(lambda: claim(staged), "generate: output dir")
    fps = _FPS.value or geo["fps"]
    config, ae, dn = rollout.load_world_model(_CHECKPOINT.value, _AUTOENCODER.value)
    clip = inference_inputs.fit_inputs(geo, config.data.resolution, _NUM_FRAMES.value)
    backend = _MEMORY.value or config.memory.backend
    num_frames = len(clip["poses_c2w"])
    r = rollout.make_rollout(config, ae, dn, backend=backend, mask_dynamic=_MASK_DYNAMIC.value,
                             object_slots=_OBJECT_SLOTS.value, sampling_options=options,
                             depth=depth_opts,
                             **memory.capacity_for(backend, num_frames, wm.memory_config(config)))
    start = time.perf_counter()
    extra = dict(depths=clip["depths"]) if r.model.needs_depths else {}
    out = r.generate(clip["first_frame"], clip["first_depth"], clip["intrinsics"], clip["poses_c2w"],
                     seed=_SEED.value, timed=True, depth_valid=clip["depth_valid"], **extra)
    total = time.perf_counter() - start

    def write() -> None:
      video.write_mp4(os.path.join(directory, "video.mp4"), out["frames"], fps=fps)
      video.write_gif(os.path.join(directory, "video.gif"), out["frames"], fps=fps)
      if not wm.has_depth_head:
        with report.atomic_output(os.path.join(directory, "cameras.npz")) as tmp:
          with open(tmp, "wb") as f:
            np.savez_compressed(f, intrinsics=clip["intrinsics"], poses_c2w=clip["poses_c2w"],
                                latent_frames=out["latent_frames"], coverage=out["coverage"],
                                **{k: out[k] for k in ("latent_depths", "depth_aligned")
                                   if k in out})
      else:
        video.write_mp4(os.path.join(directory, "depth.mp4"), video.depth_to_rgb(out["depths"]), fps=fps)
        with report.atomic_output(os.path.join(directory, "depth.npz")) as tmp:
          with open(tmp, "wb") as f:
            np.savez_compressed(f, depths=out["depths"], intrinsics=clip["intrinsics"],
                                poses_c2w=clip["poses_c2w"])
        with report.atomic_output(os.path.join(directory, "objects.npz")) as tmp:
          with open(tmp, "wb") as f:
            np.savez_compressed(f, dynamic=out["dynamic"], object_positions=out["object_positions"],
                                object_idents=out["object_idents"])
      chunks = [dict(memory_seconds=c.memory_seconds, chunk_seconds=c.chunk_seconds,
                     cache_bytes=c.cache_bytes) for c in out["timings"]]
      steady = chunks[1:] or chunks
      report.write_metrics_json(os.path.join(directory, "timings.json"), dict(
          checkpoint=_CHECKPOINT.value, geometry_path=_GEOMETRY.value, backend=backend,
          num_frames=num_frames, resolution=list(config.data.resolution), chunk_frames=r.chunk,
          seed=_SEED.value, mask_dynamic=r.model.mask_dynamic, object_slots=r.model.object_slots,
          family=config.family,
          **(dict(num_references=out["num_references"],
                  guidance_scale=r.model.guidance_scale or 0.0,
                  caption_embedding=_CAPTION.value, empty_text_embedding=_EMPTY_TEXT.value,
                  prompt=text["prompt"], negative_prompt=text["negative_prompt"])
             if "num_references" in out else {}),
          cache_bytes=out["cache_bytes"], object_bytes=out["object_bytes"], total_seconds=total,
          seconds_per_chunk_after_first=float(np.mean([c["chunk_seconds"] for c in steady])),
          memory_seconds_per_chunk_after_first=float(np.mean([c["memory_seconds"] for c in steady])),
          chunks=chunks))
      staged.close()  # uploads a gs:// --output_dir

    distributed.on_process_zero(write, "generate: outputs written")
  if jax.process_index() == 0:
    print(f"generated {num_frames} frames with memory={backend} in {total:.1f} s "
          f"(cache {out['cache_bytes']} bytes) -> {_OUTPUT.value}")
  return 0


if __name__ == "__main__":
  run_app(_main)
