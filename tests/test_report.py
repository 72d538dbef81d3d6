"""Report outputs (JSON, scaling file, tables, plots) and video writers."""

import json
import os

import imageio.v3 as iio
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.errors import InputError
from mirage_jax.evaluation import report, video


def _frames(t=6, h=16, w=24):
  """Smooth, distinct uint8 frames (T, H, W, 3) that survive lossy codecs."""
  y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  out = [np.stack([x, y, np.full_like(x, k / t)], -1) for k in range(t)]
  return video.as_uint8(np.stack(out) * 0.8 + 0.1)


def _scaling_entries():
  return [
      {"backend": "ours", "frames": 64, "cache_bytes": 1000, "memory_seconds_per_chunk": 0.01,
       "chunk_seconds": 0.5},
      {"backend": "ours", "frames": 256, "cache_bytes": 1500, "memory_seconds_per_chunk": 0.012,
       "chunk_seconds": 0.52},
      {"backend": "mirage", "frames": 64, "cache_bytes": 4000, "memory_seconds_per_chunk": 0.02,
       "chunk_seconds": 0.6},
      {"backend": "mirage", "frames": 256, "cache_bytes": 16000, "memory_seconds_per_chunk": 0.08,
       "chunk_seconds": 0.7},
      {"backend": "no_memory", "frames": 64, "cache_bytes": 0, "memory_seconds_per_chunk": 0.0,
       "chunk_seconds": 0.4},
  ]


# ----------------------------------------------------------------------------- video files


@pytest.mark.parametrize("h, w", [(16, 24), (15, 21)])
def test_mp4_reads_back_with_frame_count_and_size(tmp_path, h, w):
  frames = _frames(6, h, w)
  path = tmp_path / "clip.mp4"
  video.write_mp4(path, frames, fps=10)
  back = iio.imread(path, index=None)
  # Odd sizes get one black row/column so yuv420p can encode them.
  assert back.shape == (6, h + h % 2, w + w % 2, 3)
  assert np.abs(back[:, :h, :w].astype(int) - frames).mean() < 8
  assert os.listdir(tmp_path) == ["clip.mp4"]  # no temporary left behind


def test_gif_reads_back_with_frame_count_and_size(tmp_path):
  frames = _frames(5, 12, 20)
  path = tmp_path / "clip.gif"
  video.write_gif(path, frames, fps=5)
  back = iio.imread(path, index=None)
  assert back.shape[:3] == (5, 12, 20)
  assert np.abs(back[..., :3].astype(int) - frames).mean() < 8
  assert os.listdir(tmp_path) == ["clip.gif"]


@pytest.mark.parametrize("write", [video.write_mp4, video.write_gif])
def test_write_into_missing_directory_raises_input_error(tmp_path, write):
  path = tmp_path / "missing" / "out.mp4"
  with pytest.raises(InputError, match="cannot create a file") as e:
    write(path, _frames(2))
  assert str(path) in str(e.value) and e.value.field == "path"
  assert not path.parent.exists()
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(InputError):
    write(blocker / "out.gif", _frames(2))


def test_failed_write_leaves_previous_file_and_no_partial(tmp_path, monkeypatch):
  path = tmp_path / "clip.mp4"
  path.write_bytes(b"previous")

  class Broken:
    def __init__(self, tmp):
      self.tmp = tmp

    def append_data(self, frame):
      with open(self.tmp, "ab") as f:
        f.write(b"half a video")
      raise OSError("disk full")

    def close(self):
      pass

  monkeypatch.setattr(video.imageio_v2, "get_writer", lambda tmp, **kw: Broken(tmp))
  with pytest.raises(OSError, match="disk full"):
    video.write_mp4(path, _frames(3))
  assert path.read_bytes() == b"previous"
  assert os.listdir(tmp_path) == ["clip.mp4"]


def test_bad_frames_are_rejected(tmp_path):
  with pytest.raises(InputError, match="frames.*uint8"):
    video.write_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(InputError, match="frames.*shape"):
    video.write_gif(tmp_path / "x.gif", np.zeros((8, 8, 3), np.uint8))
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- composition


def test_side_by_side_layout():
  a = np.full((3, 4, 5, 3), 10, np.uint8)
  b = np.full((3, 4, 6, 3), 20, np.uint8)
  mask = video.mask_to_rgb(np.ones((3, 4, 2), bool))
  out = video.side_by_side([a, b, mask], separator_px=2, separator_value=200)
  assert out.shape == (3, 4, 5 + 2 + 6 + 2 + 2, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, :, :5], a)
  np.testing.assert_array_equal(out[:, :, 5:7], 200)
  np.testing.assert_array_equal(out[:, :, 7:13], b)
  np.testing.assert_array_equal(out[:, :, 15:], 255)
  with pytest.raises(ValueError, match="panel 1"):
    video.side_by_side([a, np.zeros((3, 5, 5, 3), np.uint8)])


def test_upscale_is_integer_nearest():
  frames = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
  up = video.upscale(frames, 3)
  assert up.shape == (2, 6, 9, 3)
  np.testing.assert_array_equal(up[:, ::3, ::3], frames)
  np.testing.assert_array_equal(up[:, 2::3, 2::3], frames)
  with pytest.raises(ValueError):
    video.upscale(frames, 1.5)


def test_mask_and_uint8_conversion():
  mask = np.array([[[True, False]]])
  np.testing.assert_array_equal(video.mask_to_rgb(mask, (0, 255, 0))[0, 0], [[0, 255, 0], [0, 0, 0]])
  np.testing.assert_array_equal(video.as_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])),
                                [0, 0, 128, 255, 255])
  np.testing.assert_array_equal(video.as_uint8(np.array([0.0, 255.0]), data_range=255.0), [0, 255])


def test_depth_to_rgb_consistent_colours_over_the_clip():
  depths = np.array([[[1.0, 2.0, 3.0, np.nan]], [[3.0, 2.0, 1.0, 2.0]]], np.float32)  # (2, 1, 4)
  rgb = video.depth_to_rgb(depths, vmin=1.0, vmax=3.0)
  assert rgb.shape == (2, 1, 4, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[0, 0, 0], rgb[1, 0, 2])  # same depth, same colour
  np.testing.assert_array_equal(rgb[0, 0, 1], rgb[1, 0, 3])
  assert np.any(rgb[0, 0, 0] != rgb[0, 0, 2])                # near and far differ
  np.testing.assert_array_equal(rgb[0, 0, 3], 0)             # non-finite is black
  auto = video.depth_to_rgb(depths)                          # default range from the data
  assert np.any(auto[0, 0, 0] != auto[0, 0, 2])


# ----------------------------------------------------------------------------- JSON and tables


def test_write_metrics_json_strict_and_atomic(tmp_path):
  path = tmp_path / "metrics.json"
  metrics = {"psnr": np.array([30.0, np.nan, np.inf], np.float32), "ssim": jnp.float32(0.5),
             "frames": np.int64(12), "name": "ours", "nested": {"bf16": jnp.ones(2, jnp.bfloat16)},
             "flags": [True, False]}
  report.write_metrics_json(path, metrics)

  def reject(token):
    raise AssertionError(f"non-strict JSON token {token}")

  data = json.loads(path.read_text(), parse_constant=reject)
  assert data == {"psnr": [30.0, None, None], "ssim": 0.5, "frames": 12, "name": "ours",
                  "nested": {"bf16": [1.0, 1.0]}, "flags": [True, False]}
  with pytest.raises(TypeError, match="object"):
    report.write_metrics_json(path, {"bad": object()})
  assert json.loads(path.read_text())["name"] == "ours"  # previous file intact
  assert os.listdir(tmp_path) == ["metrics.json"]


def test_format_table():
  rows = [{"backend": "ours", "psnr": 25.12345, "frames": 64},
          {"backend": "no_memory", "psnr": float("nan")}]
  table = report.format_table(rows, ["backend", "psnr", "frames"], float_format=".2f")
  lines = table.splitlines()
  assert len(lines) == 4
  assert lines[0].split("|")[1].strip() == "backend"
  assert set(lines[1]) <= {"|", "-"}
  assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["ours", "25.12", "64"]
  assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["no_memory", "-", "-"]
  assert len({len(line) for line in lines}) == 1  # columns line up


# ----------------------------------------------------------------------------- scaling.json


def test_scaling_json_round_trip(tmp_path):
  path = tmp_path / "scaling.json"
  entries = _scaling_entries()
  entries[0]["frames"] = np.int64(64)          # NumPy scalars are accepted and normalised
  entries[1]["chunk_seconds"] = np.float32(0.5)
  report.write_scaling_json(path, entries)
  back = report.read_scaling_json(path)
  assert back[2:] == _scaling_entries()[2:]
  assert back[0]["frames"] == 64 and type(back[0]["frames"]) is int
  assert back[1]["chunk_seconds"] == pytest.approx(0.5)


@pytest.mark.parametrize("mutate, field, problem", [
    (lambda e: e[1].pop("cache_bytes"), "[1].cache_bytes", "missing"),
    (lambda e: e[0].update(frames=64.0), "[0].frames", "integer"),
    (lambda e: e[0].update(frames=0), "[0].frames", "> 0"),
    (lambda e: e[2].update(cache_bytes=True), "[2].cache_bytes", "integer"),
    (lambda e: e[3].update(cache_bytes=-1), "[3].cache_bytes", ">= 0"),
    (lambda e: e[0].update(chunk_seconds="fast"), "[0].chunk_seconds", "number"),
    (lambda e: e[4].update(memory_seconds_per_chunk=float("nan")), "[4].memory_seconds_per_chunk", "finite"),
    (lambda e: e[0].update(backend=""), "[0].backend", "string"),
    (lambda e: e[1].update(cache_byte=3), "[1].cache_byte", "unknown"),
])
def test_scaling_json_rejects_bad_entries(tmp_path, mutate, field, problem):
  entries = _scaling_entries()
  mutate(entries)
  path = tmp_path / "scaling.json"
  # Written by hand (the writer validates too), as a foreign tool would.
  path.write_text(json.dumps(entries))
  with pytest.raises(InputError, match=problem) as e:
    report.read_scaling_json(path)
  assert e.value.field == field and e.value.where == str(path)
  with pytest.raises(InputError, match=problem):
    report.write_scaling_json(tmp_path / "other.json", entries)
  assert not (tmp_path / "other.json").exists()


def test_scaling_json_rejects_bad_files(tmp_path):
  path = tmp_path / "scaling.json"
  with pytest.raises(InputError, match="not found"):
    report.read_scaling_json(path)
  path.write_text("{not json")
  with pytest.raises(InputError, match="invalid JSON"):
    report.read_scaling_json(path)
  path.write_text(json.dumps({"backend": "ours"}))
  with pytest.raises(InputError, match="list"):
    report.read_scaling_json(path)
  path.write_text("[3]")
  with pytest.raises(InputError, match=r"\[0\]"):
    report.read_scaling_json(path)


# ----------------------------------------------------------------------------- plots


def _assert_png_with_content(path):
  image = iio.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image[..., :3].std() > 5  # not a blank canvas
  assert os.listdir(path.parent) == [path.name]


def test_plot_quality_vs_frame(tmp_path):
  path = tmp_path / "quality.png"
  t = np.arange(20)
  report.plot_quality_vs_frame(path, {"ours": 30 - 0.1 * t, "no_memory": 25 - 0.3 * t},
                               title="revisit PSNR")
  _assert_png_with_content(path)


def test_plot_cost_vs_length(tmp_path):
  path = tmp_path / "cost.png"
  report.plot_cost_vs_length(path, _scaling_entries(), title="cost")
  _assert_png_with_content(path)
  with pytest.raises(InputError):
    report.plot_cost_vs_length(tmp_path / "bad.png", [{"backend": "ours"}])
  assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_outputs_get_the_mode_of_a_plain_write(tmp_path, umask):
  """mkstemp's 0600 must not stick: the file gets 0666 & ~umask, like open(path, "w")."""
  from data_pipelines import files  # pylint: disable=g-import-not-at-top
  old = os.umask(umask)
  try:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    report.write_metrics_json(tmp_path / "m.json", {"a": 1.0})
    video.write_gif(tmp_path / "v.gif", _frames(2))
    clip = dict(frames=_frames(2, 8, 8), depths=np.ones((2, 8, 8), np.float32),
                intrinsics=np.tile(np.array([[8, 0, 4], [0, 8, 4], [0, 0, 1]], np.float32), (2, 1, 1)),
                poses_c2w=np.tile(np.eye(4, dtype=np.float32), (2, 1, 1)), fps=np.float32(10))
    files.save_geometry_npz(tmp_path / "geometry.npz", clip)
  finally:
    os.umask(old)
  expected = 0o666 & ~umask
  assert plain.stat().st_mode & 0o777 == expected
  for name in ("m.json", "v.gif", "geometry.npz"):
    assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
