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
the same command over the same videos (then complete folders are kept and the rest is cut: a
resume). Clip folders written under ``--videos`` are not taken for videos.
"""

from __future__ import annotations

import time

from absl import flags

from data_pipelines import raw_videos
from mirage_jax.errors import InputError, run_app

def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when run, as data_pipelines.encode_latents's: other CLIs
  that share names, e.g. --beam_runner, may be imported in the same process)."""
  flags.DEFINE_string("videos", None, "Folder (or gs:// prefix) searched for videos.",
                      flag_values=fv)
  flags.DEFINE_string("output_dir", None, "Folder (or gs:// prefix) of clip folders.",
                      flag_values=fv)
  flags.DEFINE_integer("fps", 16, "Clip frame rate.", flag_values=fv)
  flags.DEFINE_string("size", "704x1280", "Clip HEIGHTxWIDTH (a centre crop, no resize).",
                      flag_values=fv)
  flags.DEFINE_integer("frames", 81, "Frames per clip.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the video order, clip starts and samples.",
                       flag_values=fv)
  flags.DEFINE_integer("max_videos", 0, "Cut only the first N videos of the seeded order "
                       "(0: all).", flag_values=fv)
  flags.DEFINE_integer("preceding_frames", 8, "Preceding frames of train_sample.json.",
                       flag_values=fv)
  flags.DEFINE_integer("target_frames", 33, "Target frames of train_sample.json.",
                       flag_values=fv)
  flags.DEFINE_string("beam_runner", "", "Beam runner (as data_pipelines.build); empty: in "
                      "this process.", flag_values=fv)
  flags.DEFINE_list("beam_options", [], "Beam pipeline options, name=value.", flag_values=fv)


def settings(fv: flags.FlagValues = flags.FLAGS) -> raw_videos.CutSettings:
  height, width = raw_videos.parse_size(fv.size)
  return raw_videos.CutSettings(fps=fv.fps, height=height, width=width, frames=fv.frames,
                                seed=fv.seed, preceding_frames=fv.preceding_frames,
                                target_frames=fv.target_frames)


def main(fv: flags.FlagValues = flags.FLAGS) -> int:
  """Cuts as the flags (parsed into ``fv``) say; prints one line per skipped video, the
  totals and where."""
  for name in ("videos", "output_dir"):
    if not fv[name].value:
      raise InputError(f"--{name}", name, "is required")
  start = time.perf_counter()
  result = raw_videos.run(fv.videos, fv.output_dir, settings(fv), max_videos=fv.max_videos,
                          beam_runner=fv.beam_runner, beam_options=fv.beam_options)
  for line in raw_videos.summary_lines(result["outcomes"]):
    print(line)
  print(f"clip folders in {fv.output_dir} ({time.perf_counter() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  define_flags()
  run_app(main)
