r"""Raw videos -> fixed-length clip folders on Apache Beam (the reference's clip collection).

The reference (microsoft/LatentSpatialMemory, ``data_process/run_video_collect.py`` with
``clip_sampling.py`` and ``sample_indices.py``) turns each raw video into one numbered folder
that an annotator (ViPE) then fills with depth, poses and masks. This module does the same
step, with the reference's rules:

* Videos: every ``.mp4 .mov .avi .mkv .webm`` under the input folder (any depth), sorted by
  relative path, shuffled with ``random.Random(seed)`` (the reference's ``shuffle_videos``);
  ``max_videos`` > 0 keeps the first ones. The i-th video of that order gets folder
  ``%08d % i``. A skipped video leaves its number unused (so a folder's number never depends
  on how other videos fared, and every worker count writes the same folders).
* One clip per video. Skipped, with a one-line reason naming the file: a source below the
  clip's fps, shorter than ``frames / fps`` seconds, smaller than the crop (any side; a
  portrait video under a landscape size is "too small"), unreadable (no video stream,
  corrupt header, truncated data, no frames, a decode that ends early).
* Start: ``random.Random(md5(f"{seed}:{video}"))`` draws ``start ~ U(0, duration - frames /
  fps)`` seconds (the reference keys on the absolute path; here the path relative to the
  input folder, so a copy of the videos elsewhere, e.g. on ``gs://``, gives the same clips).
* Frames: clip frame k is the source frame nearest in time to ``start + k / fps`` (times from
  the stream's timestamps; the reference lets ffmpeg's ``fps`` filter pick, which is the same
  rule up to its rounding of ties). Centre crop to ``height x width`` at offset
  ``((H - height) // 2, (W - width) // 2)``, no resize (the reference's ``crop`` filter).
* Files per folder: ``clip.mp4`` (H.264, yuv420p, at ``fps``), ``source_video_path.txt``,
  ``train_sample.json`` (the reference's target-only sample: ``t0``, ``P_idx``, ``T_idx``,
  ``C_idx``; ``t0 ~ U{P, frames - T}`` with ``P`` preceding and ``T`` target frames),
  ``train_target_rgb.mp4`` (the target frames, for captioning) and ``clip.json`` (this
  module's provenance: the source video, its fps and size, the start, the source frame of
  every clip frame, the settings). ``clip.json`` is written last: a folder is complete when
  it is there.

Writes never replace anything: a folder is staged aside and renamed into place (local) or
uploaded file by file with ``clip.json`` last (``gs://``, where each object appears whole); a
complete folder found at the start is kept as it is.

Decoding and encoding run the ffmpeg binary that ``imageio-ffmpeg`` (already a dependency)
ships, one thread each (Beam runs one worker per core; one thread also keeps x264's output
the same on every machine). Why not PyAV: it would add a second copy of the FFmpeg libraries
as a new dependency for nothing this step needs: ``probe`` reads every frame's timestamp from
the packets without decoding (``-c copy -f framecrc``), ``decode`` seeks to 2 s before the
clip and keeps the frames whose timestamps are the clip's (``select`` on ``t`` with
``-copyts``: exact wherever the seek lands; a variable frame rate is handled), the crop is
ffmpeg's ``crop`` at exact offsets. ``gs://`` sources are copied to a local file first (ffmpeg
seeks in files). Not handled: a rotation tag (phone videos) is ignored, frames are cut as
stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np

from mirage_jax import paths
from mirage_jax.errors import InputError

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm")  # the reference's video_io.VIDEO_EXTS
CLIP_FILE = "clip.mp4"
SOURCE_FILE = "source_video_path.txt"
SAMPLE_FILE = "train_sample.json"
TARGET_FILE = "train_target_rgb.mp4"
META_FILE = "clip.json"  # written last: marks the folder complete
RUN_FILE = "cut_clips.json"  # the run's parameters, at the top of the output folder
SUMMARY_FILE = "cut_clips_summary.json"
SKIP_KINDS = ("unreadable", "too_short", "too_small", "fps_too_low")
_FFMPEG_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class CutSettings:
  """What a clip is (the reference's defaults: 81 frames of 704 x 1280 at 16 fps, 8 + 33)."""
  fps: int = 16
  height: int = 704
  width: int = 1280
  frames: int = 81
  seed: int = 0
  preceding_frames: int = 8
  target_frames: int = 33
  min_gap: int = 2  # candidates at least this far from the sample's frames (the reference's)

  def check(self) -> None:
    """Raises InputError (naming the flag) for settings no clip can have."""
    if self.fps < 1:
      raise InputError("--fps", "fps", f"must be >= 1, got {self.fps}")
    if self.height < 2 or self.width < 2 or self.height % 2 or self.width % 2:
      raise InputError("--size", "size", f"{self.height}x{self.width}: height and width must be "
                       "even and >= 2 (H.264 yuv420p)")
    if self.preceding_frames < 1 or self.target_frames < 1:
      raise InputError("--target_frames", "target_frames", "preceding and target frames must "
                       "be >= 1")
    if self.frames < self.preceding_frames + self.target_frames:
      raise InputError("--frames", "frames", f"{self.frames} < preceding {self.preceding_frames}"
                       f" + target {self.target_frames}")


class Skip(Exception):
  """A video that gives no clip; ``kind`` is one of SKIP_KINDS, the message one line."""

  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind


def parse_size(text: str) -> tuple[int, int]:
  """``"704x1280"`` -> (704, 1280): height x width."""
  m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text or "")
  if not m:
    raise InputError("--size", "size", f"{text!r}: expected HEIGHTxWIDTH, e.g. 704x1280")
  return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------- listing


def list_videos(root: str) -> list[str]:
  """Relative paths (``/``-separated) of the videos under ``root``, sorted."""
  return [rel for rel in paths.list_files(root)
          if os.path.splitext(rel)[1].lower() in VIDEO_EXTS]


def assign_folders(videos: Sequence[str], seed: int, max_videos: int = 0) -> list[tuple[str, str]]:
  """(folder id, video) pairs: the reference's seeded shuffle, then numbering (module doc)."""
  order = list(videos)
  random.Random(seed).shuffle(order)
  if max_videos > 0:
    order = order[:max_videos]
  return [(f"{i:08d}", rel) for i, rel in enumerate(order)]


# ----------------------------------------------------------------------------- decoding


def _ffmpeg() -> str:
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  return imageio_ffmpeg.get_ffmpeg_exe()


def _last_line(text: str) -> str:
  """The last line of an ffmpeg message, without its ``[demuxer @ 0x...]`` prefix (which
  holds a memory address: reasons must be the same on every run)."""
  lines = [" ".join(re.sub(r"\[[^\]]*@ 0x[0-9a-f]+\]", "", l).split())
           for l in text.splitlines() if l.strip()]
  lines = [l for l in lines if l]
  return lines[-1][:200] if lines else "no message"


@dataclasses.dataclass(frozen=True)
class Probe:
  """A video stream's frames in display order: times (s, from the first frame), size."""
  times: np.ndarray  # (N,) float64, ascending, times[0] == 0
  width: int
  height: int
  first_pts_s: float = 0.0  # the first frame's own timestamp (s): times + this = timestamps

  @property
  def interval(self) -> float:
    """The typical time between frames (median), seconds."""
    return float(np.median(np.diff(self.times))) if len(self.times) > 1 else 0.0

  @property
  def duration(self) -> float:
    """Seconds from the first frame to the end of the last one."""
    return float(self.times[-1] + self.interval) if len(self.times) else 0.0

  @property
  def fps(self) -> float:
    return len(self.times) / self.duration if self.duration > 0 else 0.0


def probe(path: str) -> Probe:
  """Timestamps and size of the first video stream, from its packets (no decoding).

  Raises:
    Skip: unreadable container, no video stream, no frames or no timestamps.
  """
  # -copyts: the stream's own timestamps, as decode() selects frames by them.
  cmd = [_ffmpeg(), "-v", "error", "-nostdin", "-copyts", "-i", path, "-map", "0:v:0", "-c",
         "copy", "-f", "framecrc", "-"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=_FFMPEG_TIMEOUT_S, check=False)
  if "matches no streams" in r.stderr:
    raise Skip("unreadable", "no video stream")
  if r.returncode != 0:
    raise Skip("unreadable", f"ffmpeg cannot read it ({_last_line(r.stderr)})")
  tb = re.search(r"^#tb 0: (\d+)/(\d+)", r.stdout, re.M)
  dims = re.search(r"^#dimensions 0: (\d+)x(\d+)", r.stdout, re.M)
  if not tb or not dims:
    raise Skip("unreadable", "no video stream")
  pts = []
  for line in r.stdout.splitlines():
    if line.startswith("#"):
      continue
    fields = [f.strip() for f in line.split(",")]
    if len(fields) >= 3:
      pts.append(int(fields[2]))  # stream, dts, pts, duration, size, crc
  if not pts:
    raise Skip("unreadable", "no frames" + (f" ({_last_line(r.stderr)})" if r.stderr.strip()
                                             else ""))
  if min(pts) == -(2 ** 63):
    raise Skip("unreadable", "frames without timestamps")
  t = np.sort(np.asarray(pts, np.float64)) * int(tb.group(1)) / int(tb.group(2))
  return Probe(times=t - t[0], width=int(dims.group(1)), height=int(dims.group(2)),
               first_pts_s=float(t[0]))


# Decoding starts this long before a clip's first frame (a seek to the keyframe before it),
# not at the file's start: the frames in between are decoded and dropped by timestamp.
SEEK_MARGIN_S = 2.0


def decode(path: str, p: Probe, first: int, last: int, height: int, width: int, top: int,
           left: int) -> tuple[np.ndarray, float]:
  """Frames ``first..last`` (display order) cropped to ``height x width`` at (top, left).

  The frames are chosen by their timestamps (``p``'s), so where decoding starts does not
  matter: it seeks to ``SEEK_MARGIN_S`` before the first one (the seek lands on the keyframe
  before that), and, should that give fewer frames (a file whose seek index misleads),
  decodes again from the start.

  Returns:
    ((last - first + 1, height, width, 3) uint8, the seek used in seconds: 0 = from the start).
  Raises:
    Skip: the decoder fails or ends before ``last``.
  """
  n = last - first + 1
  gaps = np.diff(p.times)
  eps = 0.25 * (float(gaps[gaps > 0].min()) if (gaps > 0).any() else 1.0)
  lo, hi = p.first_pts_s + p.times[first] - eps, p.first_pts_s + p.times[last] + eps
  vf = (f"select=between(t\\,{lo:.6f}\\,{hi:.6f}),"
        f"crop={width}:{height}:{left}:{top}:exact=1")
  size = height * width * 3
  seek = max(0.0, float(p.times[first]) - SEEK_MARGIN_S)
  for at in ((seek, 0.0) if seek > 0 else (0.0,)):
    # -noautorotate: frames as stored, the size probe() read (a rotation tag is not applied).
    cmd = [_ffmpeg(), "-v", "error", "-nostdin", "-threads", "1", "-copyts", "-noautorotate",
           *(["-ss", f"{at:.6f}"] if at > 0 else []), "-i", path, "-map", "0:v:0", "-vf", vf,
           "-fps_mode", "passthrough", "-frames:v", str(n), "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-threads", "1", "-"]
    r = subprocess.run(cmd, capture_output=True, timeout=_FFMPEG_TIMEOUT_S, check=False)
    got = len(r.stdout) // size
    if r.returncode == 0 and got >= n:
      return np.frombuffer(r.stdout[:n * size], np.uint8).reshape(n, height, width, 3), at
  why = _last_line(r.stderr.decode(errors="replace")) if r.stderr.strip() else "no error"
  raise Skip("unreadable", f"decoded {got} of the {n} frames needed ({why})")


def encode(path: str, frames: np.ndarray, fps: float) -> None:
  """(T, H, W, 3) uint8 -> an H.264 yuv420p mp4 at ``path`` (the reference's clip format).

  Its own ffmpeg process rather than ``imageio_ffmpeg.write_frames``, whose ``preexec_fn``
  is unsafe in the threads a Beam worker runs DoFns in (its ffmpeg died at random there).
  """
  t, h, w, _ = frames.shape
  cmd = [_ffmpeg(), "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
         "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt",
         "yuv420p", "-threads", "1", path]
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  try:
    for i in range(t):
      proc.stdin.write(np.ascontiguousarray(frames[i]).tobytes())
    proc.stdin.close()
  except BrokenPipeError:
    pass  # ffmpeg stopped: its status and message follow
  err = proc.stderr.read().decode(errors="replace")
  if proc.wait(timeout=_FFMPEG_TIMEOUT_S) != 0:
    raise OSError(f"ffmpeg could not write {path}: {_last_line(err)}")


# ----------------------------------------------------------------------------- one clip


def _digest(seed: int, video: str) -> bytes:
  return hashlib.md5(f"{seed}:{video}".encode("utf-8")).digest()


def nearest_frames(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Index of the frame nearest to each target time (ties: the earlier frame)."""
  j = np.clip(np.searchsorted(times, targets, side="left"), 1, len(times) - 1)
  before, after = times[j - 1], times[j]
  return np.where(targets - before <= after - targets, j - 1, j).astype(np.int64)


def plan_clip(p: Probe, video: str, s: CutSettings) -> dict[str, Any]:
  """The start and source frames of ``video``'s clip (module doc), or Skip with the reason."""
  need = s.frames / s.fps
  if p.fps + 1e-6 < s.fps:
    raise Skip("fps_too_low", f"{p.fps:.3f} fps < {s.fps} fps")
  if p.duration + 1e-6 < need:
    raise Skip("too_short", f"{p.duration:.3f} s ({len(p.times)} frames at {p.fps:.3f} fps) < "
               f"{need:.3f} s ({s.frames} frames at {s.fps} fps)")
  if p.width < s.width or p.height < s.height:
    raise Skip("too_small", f"{p.height}x{p.width} cannot be cropped to {s.height}x{s.width}")
  rng = random.Random(int.from_bytes(_digest(s.seed, video)[:8], "big"))
  max_start = max(0.0, p.duration - need)
  start = rng.uniform(0.0, max_start) if max_start > 0 else 0.0
  source = nearest_frames(p.times, start + np.arange(s.frames) / s.fps)
  return dict(start_s=start, source_frames=source, top=(p.height - s.height) // 2,
              left=(p.width - s.width) // 2)


def sample_indices(s: CutSettings, video: str) -> dict[str, Any]:
  """The reference's ``train_sample.json`` for one clip (``sample_indices.sample_frame_indices``)."""
  rng = np.random.default_rng(int.from_bytes(_digest(s.seed, video)[8:], "big"))
  t0 = int(rng.integers(s.preceding_frames, s.frames - s.target_frames + 1))
  pre = list(range(t0 - s.preceding_frames, t0))
  tgt = list(range(t0, t0 + s.target_frames))
  protected = pre + tgt
  cand = [i for i in range(s.frames) if i not in protected and
          min(abs(i - j) for j in protected) >= s.min_gap]
  return {"t0": t0, "P_idx": pre, "T_idx": tgt, "C_idx": cand, "scene_idx": t0,
          "output_size": [s.height, s.width], "naming": "figure"}


def cut(local_path: str, video: str, s: CutSettings) -> tuple[np.ndarray, dict[str, Any]]:
  """(clip frames (F, h, w, 3) uint8, clip.json contents) of one video; Skip if none."""
  p = probe(local_path)
  plan = plan_clip(p, video, s)
  src = plan["source_frames"]
  frames, _ = decode(local_path, p, int(src[0]), int(src[-1]), s.height, s.width,
                        plan["top"], plan["left"])
  meta = {
      "source_video": video, "source_fps": p.fps, "source_frames": len(p.times),
      "source_size": [p.height, p.width], "start_s": plan["start_s"],
      "start_frame": int(src[0]), "source_frame_indices": [int(i) for i in src],
      "crop_top_left": [plan["top"], plan["left"]], "fps": s.fps, "frames": s.frames,
      "size": [s.height, s.width], "seed": s.seed,
  }
  return frames[src - src[0]], meta


# ----------------------------------------------------------------------------- writing


def _write_files(folder: str, frames: np.ndarray, meta: dict, sample: dict, source: str,
                 s: CutSettings) -> list[str]:
  """Writes the folder's files into local ``folder``; returns their names, clip.json last."""
  encode(os.path.join(folder, CLIP_FILE), frames, s.fps)
  encode(os.path.join(folder, TARGET_FILE), frames[sample["T_idx"]], s.fps)
  with open(os.path.join(folder, SOURCE_FILE), "w") as f:
    f.write(source + "\n")
  with open(os.path.join(folder, SAMPLE_FILE), "w") as f:
    json.dump({**sample, "source_video_path": source}, f, indent=2)
  with open(os.path.join(folder, META_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  return [CLIP_FILE, TARGET_FILE, SOURCE_FILE, SAMPLE_FILE, META_FILE]


def is_complete(output_dir: str, folder_id: str) -> bool:
  return paths.exists(paths.join(output_dir, folder_id, META_FILE))


def write_folder(output_dir: str, folder_id: str, frames: np.ndarray, meta: dict,
                 sample: dict, source: str, s: CutSettings) -> bool:
  """Writes one clip folder without replacing anything; False if it was already there."""
  final = paths.join(output_dir, folder_id)
  if paths.is_remote(output_dir):
    stage = tempfile.mkdtemp(prefix=f"cut_{folder_id}_")
    try:
      names = _write_files(stage, frames, meta, sample, source, s)
      if is_complete(output_dir, folder_id):
        return False
      for name in names:  # clip.json last: a reader that finds it finds the rest
        paths.upload(os.path.join(stage, name), paths.join(final, name))
    finally:
      shutil.rmtree(stage, ignore_errors=True)
    return True
  stage = tempfile.mkdtemp(prefix=f".{folder_id}.", suffix=".tmp", dir=output_dir)
  try:
    _write_files(stage, frames, meta, sample, source, s)
    os.chmod(stage, 0o777 & ~_umask())
    try:
      os.rename(stage, final)  # fails if the folder exists: it is left as it is
    except OSError:
      if os.path.exists(os.path.join(final, META_FILE)):
        return False
      raise InputError(final, "folder", "exists without clip.json (an incomplete folder not "
                       "written by this tool?); move it away and run again")
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return True


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# ----------------------------------------------------------------------------- Beam


def process_video(job: tuple[str, str], videos: str, output_dir: str,
                  s: CutSettings) -> dict[str, str]:
  """One video -> its folder; the outcome ``{folder, video, status, kind, reason}``.

  A bad video is an outcome (status ``skipped``), never an exception; a write that fails
  (disk full, permissions) raises, as it is no fault of the video.
  """
  folder_id, video = job
  out = {"folder": folder_id, "video": video, "status": "", "kind": "", "reason": ""}
  if is_complete(output_dir, folder_id):
    return {**out, "status": "kept"}
  source = paths.join(videos, *video.split("/"))
  try:
    with paths.local_file(source) as local:  # gs:// is copied down: ffmpeg reads local files
      frames, meta = cut(local, video, s)
  except Skip as e:
    return {**out, "status": "skipped", "kind": e.kind, "reason": str(e)}
  except Exception as e:  # pylint: disable=broad-except  # no video may stop the run
    return {**out, "status": "skipped", "kind": "unreadable",
            "reason": f"{type(e).__name__}: {_last_line(str(e))}"}
  written = write_folder(output_dir, folder_id, frames, meta, sample_indices(s, video), source, s)
  return {**out, "status": "written" if written else "kept"}


def _cut_fn(videos: str, output_dir: str, s: CutSettings):
  import apache_beam as beam  # pylint: disable=g-import-not-at-top

  class CutClips(beam.DoFn):
    """Holds only paths and settings; counts outcomes in Beam metrics (namespace cut_clips)."""

    def process(self, job):
      out = process_video(job, videos, output_dir, s)
      name = out["status"] if out["status"] != "skipped" else f"skipped_{out['kind']}"
      beam.metrics.Metrics.counter("cut_clips", name).inc()
      if out["status"] == "skipped":
        logging.warning("skipped %s: %s", out["video"], out["reason"])
      yield out

  return CutClips()


def _write_summary(outcomes: list[dict], output_dir: str) -> None:
  outcomes = sorted(outcomes, key=lambda o: o["folder"])
  paths.write_text(paths.join(output_dir, SUMMARY_FILE), json.dumps(outcomes, indent=1))


def run_params(videos: str, found: Sequence[str], s: CutSettings,
               max_videos: int) -> dict[str, Any]:
  """What defines a run's output (stored in RUN_FILE, compared on reuse). The list of videos
  found is part of it: folder numbers depend on it, so a resume over a changed set of videos
  would keep folders that now belong to other videos."""
  listing = hashlib.sha256("\n".join(found).encode("utf-8")).hexdigest()
  return {"videos": paths.resolve(videos), "max_videos": max_videos,
          "videos_found": len(found), "video_list_sha256": listing, **dataclasses.asdict(s)}


def _inside(path: str, root: str) -> str | None:
  """``path`` relative to ``root`` (``/``-separated) if it lies under it, else None."""
  path, root = paths.resolve(path).rstrip("/"), paths.resolve(root).rstrip("/")
  return path[len(root) + 1:].replace(os.sep, "/") if path.startswith(root + "/") else None


def _check_output(output_dir: str, params: dict) -> None:
  """Refuses a non-empty output folder unless it holds this run's params (then: resume)."""
  if not paths.isdir(output_dir) or not paths.listdir(output_dir):
    return
  run_file = paths.join(output_dir, RUN_FILE)
  if not paths.exists(run_file):
    raise InputError(output_dir, "output_dir", f"not empty and no {RUN_FILE} (not a clip folder "
                     "of this tool); choose another --output_dir (nothing was changed)")
  with paths.open(run_file) as f:
    stored = json.load(f)["params"]
  differ = [k for k in sorted(set(stored) | set(params)) if stored.get(k) != params.get(k)]
  if differ:
    raise InputError(output_dir, ", ".join(differ), f"cut with {[stored.get(k) for k in differ]}"
                     f", this run asks for {[params.get(k) for k in differ]}; choose another "
                     "--output_dir (nothing was changed)")


def run(videos: str, output_dir: str, settings: CutSettings, *, max_videos: int = 0,
        beam_runner: str = "", beam_options: Sequence[str] = ()) -> dict[str, Any]:
  """Cuts every video under ``videos`` into ``output_dir`` on Beam (module doc).

  Returns:
    {"outcomes": [per video, by folder], "counters": {name: count}} (the Beam counters:
    written, kept, skipped_<kind>).
  Raises:
    InputError: bad settings, no videos, an output folder of another run, bad Beam options.
  """
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  settings.check()
  if max_videos < 0:
    raise InputError("--max_videos", "max_videos", f"must be >= 0, got {max_videos}")
  for path, flag in ((videos, "--videos"), (output_dir, "--output_dir")):
    if not path:
      raise InputError(flag, flag[2:], "is required")
    paths.check_reachable(path, flag)
  options = builders.beam_options(beam_runner, beam_options)
  if not paths.isdir(videos):
    raise InputError(videos, "videos", "no such folder")
  found = list_videos(videos)
  below = _inside(output_dir, videos)
  if below is not None:  # the clips are no source videos (on a second run they would be)
    found = [v for v in found if not v.startswith(below + "/")]
  if not found:
    raise InputError(videos, "videos", f"no videos ({' '.join(VIDEO_EXTS)}) under it")
  jobs = assign_folders(found, settings.seed, max_videos)
  params = run_params(videos, found, settings, max_videos)
  _check_output(output_dir, params)
  try:
    paths.makedirs(output_dir)
    paths.write_text(paths.join(output_dir, RUN_FILE), json.dumps({"params": params}, indent=2))
  except OSError as e:
    raise InputError(output_dir, "output_dir", f"cannot write there ({e})") from e
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  # Workers open the folders themselves: a local one must be a path they all see.
  vids = videos if paths.is_remote(videos) else os.path.abspath(videos)
  out = output_dir if paths.is_remote(output_dir) else os.path.abspath(output_dir)
  p = beam.Pipeline(options=options)
  _ = (p | "videos" >> beam.Create(jobs)
       | "spread" >> beam.Reshuffle()
       | "cut" >> beam.ParDo(_cut_fn(vids, out, settings))
       | "gather" >> beam.combiners.ToList()
       | "summary" >> beam.Map(_write_summary, out))
  result = p.run()
  result.wait_until_finish()
  counters = {}
  for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("cut_clips"))[
      "counters"]:
    counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed
  with paths.open(paths.join(output_dir, SUMMARY_FILE)) as f:
    outcomes = json.load(f)
  return {"outcomes": outcomes, "counters": counters}


def summary_lines(outcomes: list[dict]) -> Iterator[str]:
  """One line per skipped video, then the totals."""
  counts: dict[str, int] = {}
  for o in outcomes:
    key = o["status"] if o["status"] != "skipped" else f"skipped ({o['kind']})"
    counts[key] = counts.get(key, 0) + 1
    if o["status"] == "skipped":
      yield f"skipped {o['video']}: {o['reason']}"
  yield f"{len(outcomes)} videos: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
