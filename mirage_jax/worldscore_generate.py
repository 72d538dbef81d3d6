"""Generates WorldScore's cases with a world-model export, in the layout its evaluator reads.

  python -m mirage_jax.worldscore_generate --checkpoint=EXPORT --depth_model=DEPTH_EXPORT \\
      --cases=$DATA_PATH/WorldScore-Dataset --output_dir=$MODEL_PATH/mirage/worldscore_output \\
      [--visual_movement=static,dynamic] [--frames=50] [--num_cases=N]

Per case (``evaluation/worldscore.py`` reads the case list and writes the folders): the input
image centre-cropped to ``--resolution`` (default: the model's), WorldScore's camera path of
the case's layout words (``--frames`` per layout, ``--camera_speed``) as OpenCV
camera-to-world poses with its pinhole (fx = fy = ``--focal_length``, principal point at the
centre), generated from the image alone: WorldScore gives no depth, so frame 0's depth (and,
for the Wan family, every new frame's) comes from the Depth Anything export ``--depth_model``.
The frames are resized back to ``--resolution`` and written with WorldScore's
``camera_data.json`` (Blender camera-to-world) and ``image_data.json``; then, in WorldScore's
own environment, its ``run_evaluate.py`` with a model config whose ``runs_root`` /
``output_dir`` is ``--output_dir`` and whose ``frames`` is ``--frames`` scores them.

Prompts: the case's first prompt with its style sentence (as the reference's
eval/run_worldscore.py) is the Wan family's text (``--text_encoder`` / ``--tokenizer``, as in
``mirage_jax.generate``); the small family has no text input and ignores it.

A case whose folder is already complete is skipped (WorldScore's ``regenerate: False``)
unless ``--regenerate``.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from mirage_jax import depth, paths
from mirage_jax.errors import InputError, run_app

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Denoiser export (python -m mirage_jax.export).")
_AUTOENCODER = flags.DEFINE_string("autoencoder", None,
                                   "Autoencoder export (default: the one the denoiser was trained with).")
_CASES = flags.DEFINE_string("cases", None, "WorldScore's dataset folder ($DATA_PATH/WorldScore-Dataset).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "WorldScore's output folder (runs_root/output_dir).")
_MOVEMENT = flags.DEFINE_list("visual_movement", ["static", "dynamic"], "Case lists to generate.")
_JSON = flags.DEFINE_string("json_file", "", "Case list file name under each visual movement "
                            "(default: <visual_movement>.json).")
_FRAMES = flags.DEFINE_integer("frames", 50, "Frames per camera layout (WorldScore's config "
                               "'frames'; base_config.yaml: 50).")
_RESOLUTION = flags.DEFINE_list("resolution", None, "W,H of the written frames (WorldScore's "
                                "config 'resolution'; default: the model's). Same aspect as the model.")
_FOCAL = flags.DEFINE_float("focal_length", 500.0, "WorldScore's focal length in pixels at --resolution.")
_SPEED = flags.DEFINE_float("camera_speed", 1.0, "WorldScore's camera_speed (the size of one move).")
_NUM_CASES = flags.DEFINE_integer("num_cases", None, "Cases per visual movement (default all).")
_MEMORY = flags.DEFINE_string("memory", None, "Memory backend (default: the training config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (every case).")
_FPS = flags.DEFINE_float("fps", 10.0, "Frame rate of videos/output.mp4 (WorldScore's default 10).")
_REGENERATE = flags.DEFINE_bool("regenerate", False, "Generate complete cases again.")
# Wan family only (as in mirage_jax.generate).
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Wan: classifier-free guidance scale.")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "Wan: umT5 export (default: the "
                                    "export's denoiser.text_encoder).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Wan: the umT5 tokenizer folder.")
_DEPTH_OPTIONS = depth.define_flags()


def _resolution(model_hw) -> tuple[int, int]:
  """(W, H) of the written frames; refuses an aspect other than the model's (the frames are
  resized, not cropped, so the pinhole stays WorldScore's)."""
  if _RESOLUTION.value is None:
    return int(model_hw[1]), int(model_hw[0])
  try:
    w, h = (int(x) for x in _RESOLUTION.value)
  except ValueError:
    raise InputError("--resolution", "resolution", f"expected W,H, got {_RESOLUTION.value}") from None
  if abs(w / h - model_hw[1] / model_hw[0]) > 0.01 * w / h:
    raise InputError("--resolution", "resolution", f"{w}x{h} has another aspect than the "
                     f"model's {model_hw[1]}x{model_hw[0]} (W x H)")
  return w, h


def _main() -> int:
  for flag in (_CHECKPOINT, _CASES, _OUTPUT):
    if not flag.value:
      raise InputError(f"--{flag.name}", flag.name, "required")
  for flag in (_CASES, _OUTPUT):
    paths.require_local(flag.value, f"--{flag.name}", "copy it to a local disk first")
  if _FRAMES.value < 2:
    raise InputError("--frames", "frames", f"need at least 2, got {_FRAMES.value}")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mirage_jax import checkpoint, families, memory, rollout  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import inference_inputs, worldscore  # pylint: disable=g-import-not-at-top

  cases = []
  for movement in _MOVEMENT.value:
    cases += worldscore.load_cases(_CASES.value, movement, _JSON.value)[:_NUM_CASES.value]
  paths.check_reachable(_CHECKPOINT.value, "--checkpoint")
  config = families.upgrade(checkpoint.export_config(_CHECKPOINT.value))
  wm = families.world_model(config)
  if _MEMORY.value is not None and _MEMORY.value not in memory.BACKEND_NAMES:
    raise InputError("--memory", "memory", f"unknown backend {_MEMORY.value!r}")
  depth_opts = _DEPTH_OPTIONS(wm)
  if depth_opts.estimator != "depth_anything":
    raise InputError("--depth_model", "depth_model", "WorldScore's cases carry no depth: give a "
                     "Depth Anything V2 export (python -m mirage_jax.convert_depth)")
  paths.check_reachable(depth_opts.model, "--depth_model")
  width, height = _resolution(config.data.resolution)
  text_family = wm.takes_text
  if not text_family:
    print(f"note: the {wm.name} family has no text input; the cases' prompts are not used")
    for flag in (_GUIDANCE, _TEXT_ENCODER, _TOKENIZER):
      if flag.value is not None:
        raise InputError(f"--{flag.name}", flag.name, f"only a text-conditioned family takes it, not {wm.name!r}")

  todo = [c for c in cases if _REGENERATE.value or not worldscore.is_complete(
      paths.join(_OUTPUT.value, c.relative_dir), worldscore.total_frames(c, _FRAMES.value))]
  if not todo:  # nothing to load the model for
    print(f"worldscore: 0 cases generated, {len(cases)} complete ones skipped -> {_OUTPUT.value}")
    return 0
  config, ae, dn = rollout.load_world_model(_CHECKPOINT.value, _AUTOENCODER.value)
  backend = _MEMORY.value or config.memory.backend
  texts = {}  # prompt -> embedding: the text encoder loaded once, freed before generating
  if text_family:
    unique = sorted({c.prompts[0] for c in todo})
    texts = dict(zip(unique, wm.encode_prompts(config, unique, text_encoder=_TEXT_ENCODER.value,
                                               tokenizer=_TOKENIZER.value)))
    options = wm.sampling_options(config, guidance_scale=_GUIDANCE.value,
                                  text_encoder=_TEXT_ENCODER.value, tokenizer=_TOKENIZER.value)
  else:
    options = {}
  rollouts = {}  # trajectory length -> Rollout: compiled once per length; the text is swapped

  def rollout_for(num_frames: int):
    if num_frames not in rollouts:
      rollouts[num_frames] = rollout.make_rollout(
          config, ae, dn, backend=backend, sampling_options=options, depth=depth_opts,
          **memory.capacity_for(backend, num_frames, wm.memory_config(config)))
    return rollouts[num_frames]

  for case in todo:
    case_dir = paths.join(_OUTPUT.value, case.relative_dir)
    t = worldscore.total_frames(case, _FRAMES.value)
    start = time.perf_counter()
    keys_w2c, cams_w2c = worldscore.camera_path_w2c(case.camera_path, _FRAMES.value, _SPEED.value)
    keys_blender = worldscore.blender_c2w(keys_w2c)
    cams_blender = worldscore.blender_c2w(cams_w2c)
    with Image.open(case.image_path) as image:
      first = worldscore.center_crop(image, width, height)
    geo = dict(frames=first[None], first_depth=None, depths=None,
               intrinsics=worldscore.intrinsics(t, width, height, _FOCAL.value),
               poses_c2w=worldscore.opencv_c2w(cams_blender).astype(np.float32))
    clip = inference_inputs.fit_inputs(geo, config.data.resolution)
    prompt = case.prompts[0] if text_family else None
    r = rollout_for(t)
    if text_family:
      r.set_text(texts[prompt])
    out = r.generate(clip["first_frame"], None, clip["intrinsics"], clip["poses_c2w"],
                     seed=_SEED.value, progress=False)
    frames = worldscore.resize_frames(np.asarray(out["frames"]), width, height)
    seconds = time.perf_counter() - start
    worldscore.write_case(
        case_dir, case, frames, first, keys_blender, cams_blender, frames_per_scene=_FRAMES.value,
        focal=_FOCAL.value, speed=_SPEED.value, fps=_FPS.value, seconds=seconds,
        extra=dict(checkpoint=_CHECKPOINT.value, family=config.family, backend=backend,
                   depth_model=depth_opts.model, seed=_SEED.value, prompt=prompt,
                   prompt_used=text_family, model_resolution=list(config.data.resolution),
                   resolution=[width, height], poses_c2w_opencv=geo["poses_c2w"]))
    print(f"{case.relative_dir}: {t} frames in {seconds:.1f} s", flush=True)
  print(f"worldscore: {len(todo)} cases generated, {len(cases) - len(todo)} complete ones "
        f"skipped -> {_OUTPUT.value}")
  return 0


if __name__ == "__main__":
  run_app(_main)
