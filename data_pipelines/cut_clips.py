r"""Cuts raw videos into fixed-length clip folders for annotation (ViPE), on Beam.

  python -m data_pipelines.cut_clips --videos=DIR --output_dir=CLIPS --fps=16 \
      --size=704x1280 --frames=81 --seed=0 [--max_videos=0 --preceding_frames=8 \
      --target_frames=33]
  # On several local processes or a cluster (as data_pipelines.build):
  #   --beam_runner=DirectRunner --beam_options=direct_num_workers=8,direct_running_mode=multi_processing

``--videos`` and ``--output_dir`` may be local folders or ``gs://`` prefixes (a cluster
runner's workers need storage they all see). Each video gives one folder
``CLIPS/<8 digits>/`` holding ``clip.mp4``, ``source_video_path.txt``, ``train_sample.json``,
``train_target_rgb.mp4`` and ``clip.json`` (the reference's layout; the rules are in
``data_pipelines/raw_videos.py``). Videos that give no clip are listed with their reason at
the end; the run goes on. A non-empty ``--output_dir`` is refused unless it was written by
the same command (then complete folders are kept and the rest is cut: a resume).
"""

from __future__ import annotations

import time

from absl import app, flags

from data_pipelines import raw_videos
from mirage_jax.errors import InputError, parse_flags, run_cli

_VIDEOS = flags.DEFINE_string("videos", None, "Folder (or gs:// prefix) searched for videos.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Folder (or gs:// prefix) of clip folders.")
_FPS = flags.DEFINE_integer("fps", 16, "Clip frame rate.")
_SIZE = flags.DEFINE_string("size", "704x1280", "Clip HEIGHTxWIDTH (a centre crop, no resize).")
_FRAMES = flags.DEFINE_integer("frames", 81, "Frames per clip.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the video order, clip starts and samples.")
_MAX = flags.DEFINE_integer("max_videos", 0, "Cut only the first N videos of the seeded "
                            "order (0: all).")
_PRE = flags.DEFINE_integer("preceding_frames", 8, "Preceding frames of train_sample.json.")
_TGT = flags.DEFINE_integer("target_frames", 33, "Target frames of train_sample.json.")
_RUNNER = flags.DEFINE_string("beam_runner", "", "Beam runner (as data_pipelines.build); "
                              "empty: in this process.")
_OPTIONS = flags.DEFINE_list("beam_options", [], "Beam pipeline options, name=value.")


def settings() -> raw_videos.CutSettings:
  height, width = raw_videos.parse_size(_SIZE.value)
  return raw_videos.CutSettings(fps=_FPS.value, height=height, width=width,
                                frames=_FRAMES.value, seed=_SEED.value,
                                preceding_frames=_PRE.value, target_frames=_TGT.value)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise InputError("command line", "arguments", f"unexpected {argv[1:]} (all options are --flags)")
  for flag in (_VIDEOS, _OUTPUT):
    if not flag.value:
      raise InputError(f"--{flag.name}", flag.name, "is required")
  start = time.perf_counter()
  result = raw_videos.run(_VIDEOS.value, _OUTPUT.value, settings(), max_videos=_MAX.value,
                          beam_runner=_RUNNER.value, beam_options=_OPTIONS.value)
  for line in raw_videos.summary_lines(result["outcomes"]):
    print(line)
  print(f"clip folders in {_OUTPUT.value} ({time.perf_counter() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: run_cli(lambda: main(argv)), flags_parser=parse_flags)
