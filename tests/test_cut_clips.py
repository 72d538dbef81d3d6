"""Raw videos -> clip folders (data_pipelines/raw_videos.py, cut_clips): tiny synthetic videos.

Each synthetic source frame shows its own frame number as 8 black/white bars inside the
region the centre crop keeps, on a grey margin that the crop must cut away; so reading a clip
back tells exactly which source frames landed in it, and whether the crop was centred to the
pixel (a grey edge row or column; grey, not a colour: chroma is subsampled, luma is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import raw_videos
from mirage_jax.errors import InputError
from tests import test_gcs
from tests.test_gcs import gcs  # pylint: disable=unused-import  # the emulator fixture

H, W = 48, 80
SETTINGS = raw_videos.CutSettings(fps=8, height=H, width=W, frames=9, seed=3,
                                  preceding_frames=2, target_frames=5)
# name -> (frames, height, width, fps): odd sizes (crop margins of 5, 7, 2, ... pixels),
# fps above, at and far above the clip's, a 29.97 NTSC rate; one exactly the crop size.
GOOD = {
    "a.mp4": (50, 58, 94, 30),
    "sub/b.mov": (40, 52, 88, 25),
    "sub/deeper/c.mkv": (24, 48, 80, 12),
    "d.mp4": (45, 62, 84, 30000 / 1001),
}
BROKEN = {  # name -> the kind it must be skipped as
    "trunc_index.mp4": "unreadable", "trunc_data.mp4": "unreadable", "zero.mp4": "unreadable",
    "header.mp4": "unreadable", "short.mp4": "too_short", "small.mp4": "too_small",
    "slow.mp4": "fps_too_low",
}


def write_video(path: Path, n: int, height: int, width: int, fps: float,
                faststart: bool = False, keyframes_every: int = 0) -> None:
  """A video whose frame i shows i in binary inside the centred H x W region (module doc)."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  top, left = (height - H) // 2, (width - W) // 2
  writer = imageio_ffmpeg.write_frames(
      str(path), (width, height), fps=fps, codec="libx264", quality=None, macro_block_size=1,
      ffmpeg_log_level="error",
      output_params=((["-movflags", "+faststart"] if faststart else []) +
                     (["-g", str(keyframes_every)] if keyframes_every else [])))
  writer.send(None)
  for i in range(n):
    frame = np.full((height, width, 3), 128, np.uint8)  # the margin: grey
    bars = np.zeros((H, W, 3), np.uint8)
    for b in range(8):
      if (i >> b) & 1:
        bars[:, b * W // 8:(b + 1) * W // 8] = 255
    if top >= 0 and left >= 0:  # (a source smaller than the crop: all grey)
      frame[top:top + H, left:left + W] = bars
    writer.send(frame.tobytes())
  writer.close()


def frame_numbers(frames: np.ndarray) -> list[int]:
  """The numbers ``write_video`` drew, read at the bars' centres; asserts no grey edge."""
  grey = frames.astype(np.float32).mean(-1)
  bar = W // 8
  inside = [x for x in range(W) if 2 <= x % bar <= bar - 2]  # away from the bars' own edges
  edges = np.concatenate([grey[:, 0, inside], grey[:, -1, inside], grey[:, 2:-2, 0],
                          grey[:, 2:-2, -1]], axis=1)
  assert np.abs(edges - 127.5).min() > 60, "a grey edge in the clip: the crop is off-centre"
  out = []
  for f in frames:
    bits = [f[H // 2 - 4:H // 2 + 4, b * W // 8 + 3:(b + 1) * W // 8 - 3].mean() > 128
            for b in range(8)]
    out.append(sum(1 << b for b, on in enumerate(bits) if on))
  return out


def read_mp4(path: Path) -> np.ndarray:
  p = raw_videos.probe(str(path))
  return raw_videos.decode(str(path), p, 0, len(p.times) - 1, p.height, p.width, 0, 0)[0]


def expected_clip(name: str, n: int, fps: float) -> tuple[float, list[int]]:
  """The reference's start rule and nearest-frame indices, computed from scratch."""
  digest = hashlib.md5(f"{SETTINGS.seed}:{name}".encode()).digest()
  max_start = n / fps - SETTINGS.frames / SETTINGS.fps
  start = random.Random(int.from_bytes(digest[:8], "big")).uniform(0, max_start) \
      if max_start > 0 else 0.0
  times = start + np.arange(SETTINGS.frames) / SETTINGS.fps
  return start, [int(np.floor(t * fps + 0.5 - 1e-9)) for t in times]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("videos")
  for name, spec in GOOD.items():
    write_video(root / name, *spec)
  write_video(root / "full.mp4", 30, 50, 84, 24)
  write_video(root / "full_fast.mp4", 30, 50, 84, 24, faststart=True)
  data, fast = (root / "full.mp4").read_bytes(), (root / "full_fast.mp4").read_bytes()
  (root / "trunc_index.mp4").write_bytes(data[:len(data) // 2])  # index at the end: lost
  (root / "trunc_data.mp4").write_bytes(fast[:len(fast) // 3])  # index first, data cut
  (root / "full.mp4").unlink()
  (root / "full_fast.mp4").unlink()
  write_video(root / "zero.mp4", 0, 50, 84, 24)
  (root / "header.mp4").write_bytes(b"\x00garbage" * 8 + data[64:])
  write_video(root / "short.mp4", 6, 50, 84, 24)
  write_video(root / "small.mp4", 40, 40, 70, 24)  # below 48 x 80
  write_video(root / "slow.mp4", 12, 50, 84, 6)  # 2 s, but 6 fps < 8
  (root / "notes.txt").write_text("not a video: ignored")
  return root


def tree_digest(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_clips_on_two_workers_hold_the_reference_frames(videos, tmp_path):
  one = raw_videos.run(str(videos), str(tmp_path / "one"), SETTINGS)
  two = raw_videos.run(str(videos), str(tmp_path / "two"), SETTINGS, beam_runner="DirectRunner",
                       beam_options=["direct_num_workers=2", "direct_running_mode=multi_processing"])
  assert one["outcomes"] == two["outcomes"]
  assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")  # byte for byte
  assert one["counters"] == two["counters"] == {
      "written": 4, "skipped_unreadable": 4, "skipped_too_short": 1, "skipped_too_small": 1,
      "skipped_fps_too_low": 1}
  # Folder numbers: the seeded shuffle of the sorted videos (the reference's shuffle_videos).
  order = sorted(list(GOOD) + list(BROKEN))
  random.Random(SETTINGS.seed).shuffle(order)
  by_video = {o["video"]: o for o in one["outcomes"]}
  assert sorted(by_video) == sorted(order)
  for name, spec in GOOD.items():
    folder = tmp_path / "one" / by_video[name]["folder"]
    assert by_video[name]["folder"] == f"{order.index(name):08d}"
    meta = json.loads((folder / "clip.json").read_text())
    start, want = expected_clip(name, spec[0], spec[3])
    assert meta["start_s"] == pytest.approx(start, abs=1e-9)
    assert meta["source_frame_indices"] == want, name
    assert meta["crop_top_left"] == [(spec[1] - H) // 2, (spec[2] - W) // 2]
    clip = read_mp4(folder / "clip.mp4")
    assert clip.shape == (SETTINGS.frames, H, W, 3)
    assert frame_numbers(clip) == want, name  # which source frames landed, exactly
    sample = json.loads((folder / "train_sample.json").read_text())
    t0 = sample["t0"]
    assert SETTINGS.preceding_frames <= t0 <= SETTINGS.frames - SETTINGS.target_frames
    assert sample["T_idx"] == list(range(t0, t0 + SETTINGS.target_frames))
    assert sample["P_idx"] == list(range(t0 - SETTINGS.preceding_frames, t0))
    assert frame_numbers(read_mp4(folder / "train_target_rgb.mp4")) == [want[i] for i in sample["T_idx"]]
    source = str(videos / name)
    assert (folder / "source_video_path.txt").read_text() == source + "\n"
    assert sample["source_video_path"] == source
  for name, kind in BROKEN.items():
    assert (by_video[name]["status"], by_video[name]["kind"]) == ("skipped", kind), by_video[name]
    assert not (tmp_path / "one" / by_video[name]["folder"]).exists()
  lines = list(raw_videos.summary_lines(one["outcomes"]))
  for name in BROKEN:  # one line each, naming the file
    assert len([l for l in lines if l.startswith(f"skipped {name}: ")]) == 1, lines
  assert lines[-1].startswith("11 videos: ")
  assert not [p for p in (tmp_path / "one").iterdir() if p.name.startswith(".")]  # no stage left

  # Again into the same folder: every complete folder is kept, nothing is rewritten.
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.mp4")}
  again = raw_videos.run(str(videos), str(tmp_path / "one"), SETTINGS)
  assert again["counters"]["kept"] == 4 and "written" not in again["counters"]
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*.mp4")} == before
  # Other settings, or a folder of something else: refused, nothing changed.
  snapshot = tree_digest(tmp_path / "one")
  with pytest.raises(InputError, match=r"seed.*choose another --output_dir"):
    raw_videos.run(str(videos), str(tmp_path / "one"), raw_videos.CutSettings(
        **{**SETTINGS.__dict__, "seed": 4}))
  assert tree_digest(tmp_path / "one") == snapshot
  # A changed set of videos: the folder numbers would change, so it is another run.
  more = tmp_path / "more"
  shutil.copytree(videos, more)
  write_video(more / "e.mp4", 30, 48, 80, 24)
  with pytest.raises(InputError, match=r"video_list_sha256.*choose another --output_dir"):
    raw_videos.run(str(more), str(tmp_path / "one"), SETTINGS)
  assert tree_digest(tmp_path / "one") == snapshot
  # Clips written under the videos' folder are not taken for videos on the next run.
  raw_videos.run(str(more), str(more / "clips"), SETTINGS, max_videos=4)
  assert list((more / "clips").rglob("clip.mp4"))
  again = raw_videos.run(str(more), str(more / "clips"), SETTINGS, max_videos=4)
  assert "written" not in again["counters"] and again["counters"]["kept"] >= 1
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "mine.txt").write_text("x")
  with pytest.raises(InputError, match="not empty"):
    raw_videos.run(str(videos), str(tmp_path / "other"), SETTINGS)
  assert os.listdir(tmp_path / "other") == ["mine.txt"]


def test_decoding_from_a_seek_gives_the_frames_of_decoding_from_the_start(tmp_path, monkeypatch):
  """A clip deep in a long source: decode() seeks (to a keyframe before it) and picks frames
  by timestamp; the frames are those a decode from the file's start gives."""
  path = tmp_path / "long.mp4"
  write_video(path, 150, 52, 84, 30, keyframes_every=12)  # 5 s, a keyframe every 0.4 s
  p = raw_videos.probe(str(path))
  args = (str(path), p, 100, 120, H, W, 2, 2)
  monkeypatch.setattr(raw_videos, "SEEK_MARGIN_S", 0.05)
  seeked, at = raw_videos.decode(*args)
  assert at == pytest.approx(p.times[100] - 0.05)
  monkeypatch.setattr(raw_videos, "SEEK_MARGIN_S", 100.0)
  whole, at = raw_videos.decode(*args)
  assert at == 0.0
  np.testing.assert_array_equal(seeked, whole)
  assert frame_numbers(seeked) == list(range(100, 121))


def test_fuzzed_videos_are_written_or_skipped_never_raised(tmp_path):
  """Random truncations and byte corruptions of a good video (seeded): each gives a complete
  clip or a skip with a one-line reason, never an exception."""
  good = tmp_path / "good.mp4"
  write_video(good, 40, 52, 84, 24, faststart=True, keyframes_every=8)
  data = good.read_bytes()
  rng = np.random.default_rng(0)
  src = tmp_path / "src"
  for i in range(8):
    lo = 0 if i < 4 else len(data) // 3  # anywhere (the index first), then the frames' data
    if i % 2:
      blob = data[:int(rng.integers(max(lo, 16), len(data)))]
    else:
      arr = np.frombuffer(data, np.uint8).copy()
      at = rng.integers(lo, len(data), size=int(rng.integers(1, 64)))
      arr[at] = rng.integers(0, 256, size=len(at))
      blob = arr.tobytes()
    src.mkdir(exist_ok=True)
    (src / f"f{i}.mp4").write_bytes(blob)
  out = tmp_path / "out"
  out.mkdir()
  past_probe = 0
  for i in range(8):
    o = raw_videos.process_video((f"{i:08d}", f"f{i}.mp4"), str(src), str(out), SETTINGS)
    past_probe += o["kind"] != "unreadable" or o["reason"].startswith("decoded")
    if o["status"] == "skipped":
      assert o["kind"] in raw_videos.SKIP_KINDS and o["reason"] and "\n" not in o["reason"], o
      assert not (out / o["folder"]).exists()
    else:
      assert o["status"] == "written", o
      assert read_mp4(out / o["folder"] / "clip.mp4").shape == (SETTINGS.frames, H, W, 3)
  assert past_probe >= 2  # the fuzz reached past the header, into the frames


def test_an_existing_folder_is_never_replaced(videos, tmp_path):
  """write_folder onto a complete folder (as a retried or racing worker would) keeps it."""
  frames = np.zeros((SETTINGS.frames, H, W, 3), np.uint8)
  sample = raw_videos.sample_indices(SETTINGS, "x.mp4")
  assert raw_videos.write_folder(str(tmp_path), "00000000", frames, {"v": 1}, sample, "x", SETTINGS)
  first = tree_digest(tmp_path)
  assert not raw_videos.write_folder(str(tmp_path), "00000000", frames + 9, {"v": 2}, sample, "x",
                                     SETTINGS)
  assert tree_digest(tmp_path) == first
  assert sorted(os.listdir(tmp_path)) == ["00000000"]


def test_bad_settings_are_one_line_errors(videos, tmp_path):
  cases = [({"height": 47}, "--size"), ({"frames": 6}, "--frames"), ({"fps": 0}, "--fps")]
  for change, where in cases:
    with pytest.raises(InputError, match=where):
      raw_videos.run(str(videos), str(tmp_path / "x"), raw_videos.CutSettings(
          **{**SETTINGS.__dict__, **change}))
  with pytest.raises(InputError, match="HEIGHTxWIDTH"):
    raw_videos.parse_size("1280")
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="no videos"):
    raw_videos.run(str(tmp_path / "empty"), str(tmp_path / "x"), SETTINGS)
  assert not (tmp_path / "x").exists()


def test_gcs_videos_to_gcs_clips_by_the_cli(videos, gcs, tmp_path, capsys):  # pylint: disable=redefined-outer-name
  """The command line (its main, in this process, which the emulator fixture points at the
  bucket), with both folders on Cloud Storage: the clips of the reference's rules, the
  skipped videos listed; a second run with other settings refused."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from data_pipelines import build  # pylint: disable=g-import-not-at-top,unused-import
  from data_pipelines import cut_clips  # pylint: disable=g-import-not-at-top
  from mirage_jax import paths  # pylint: disable=g-import-not-at-top
  del gcs
  bucket = f"gs://{test_gcs.BUCKET}"
  for name in (*GOOD, "short.mp4", "header.mp4"):
    paths.upload(str(videos / name), f"{bucket}/raw/{name}")
  args = [f"--videos={bucket}/raw", f"--output_dir={bucket}/clips", "--fps=8", "--size=48x80",
          "--frames=9", "--seed=3", "--preceding_frames=2", "--target_frames=5"]
  fv = flags.FlagValues()  # (build's --beam_runner is in absl's global flags: no clash)
  cut_clips.define_flags(fv)
  fv(["cut_clips", *args])
  assert cut_clips.main(fv) == 0
  out = capsys.readouterr().out
  assert "skipped short.mp4: " in out and "skipped header.mp4: " in out
  assert "6 videos: " in out, out
  outcomes = json.loads(paths.open(f"{bucket}/clips/{raw_videos.SUMMARY_FILE}").read())
  local = tmp_path / "local"
  for o in outcomes:
    if o["status"] != "written":
      continue
    folder = f"{bucket}/clips/{o['folder']}"
    assert sorted(paths.listdir(folder)) == sorted([
        "clip.json", "clip.mp4", "source_video_path.txt", "train_sample.json",
        "train_target_rgb.mp4"])
    local.mkdir(exist_ok=True)
    with paths.open(f"{folder}/clip.mp4", "rb") as f:
      (local / "clip.mp4").write_bytes(f.read())
    meta = json.loads(paths.open(f"{folder}/clip.json").read())
    spec = GOOD[o["video"]]
    assert meta["source_frame_indices"] == expected_clip(o["video"], spec[0], spec[3])[1]
    assert frame_numbers(read_mp4(local / "clip.mp4")) == meta["source_frame_indices"]
  assert sum(o["status"] == "written" for o in outcomes) == len(GOOD)
  # Other settings into the same gs:// folder: refused (in process: the emulator's
  # settings are this process's too), nothing changed there.
  before = paths.list_files(f"{bucket}/clips")
  with pytest.raises(InputError, match=r"target_frames.*choose another --output_dir"):
    raw_videos.run(f"{bucket}/raw", f"{bucket}/clips", raw_videos.CutSettings(
        **{**SETTINGS.__dict__, "target_frames": 4}))
  assert paths.list_files(f"{bucket}/clips") == before
