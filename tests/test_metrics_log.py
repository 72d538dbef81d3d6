"""metrics_log: JSONL + TensorBoard event files written by tensorboardX, read by TensorBoard."""

import io
import json
import os

import numpy as np
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing import event_accumulator

from mirage_jax import metrics_log


def test_scalars_images_and_videos_read_back_by_tensorboard(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
  frames = rng.integers(0, 256, (5, 8, 12, 3), dtype=np.uint8)
  writer = metrics_log.MetricsWriter(str(tmp_path))
  writer.write_scalars(1, {"loss": 0.5, "eval_psnr": 20.25})
  writer.write_images(1, {"rollout/frame": image})
  writer.write_videos(3, {"rollout/video": frames}, fps=4)
  writer.write_scalars(3, {"loss": 0.125})
  writer.close()

  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 1, "loss": 0.5, "eval_psnr": 20.25}, {"step": 3, "loss": 0.125}]
  (name,) = os.listdir(tmp_path / "tensorboard")
  path = str(tmp_path / "tensorboard" / name)
  assert metrics_log.read_events(path) == [(1, {"loss": 0.5, "eval_psnr": 20.25}), (3, {"loss": 0.125})]
  assert metrics_log.read_tags(path) == {
      "scalars": {"loss": [1, 3], "eval_psnr": [1]}, "images": {"rollout/frame": [1]},
      "videos": {"rollout/video": [3]}}

  # TensorBoard's own accumulator (what the dashboard reads) sees the same.
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"loss", "eval_psnr"}
  assert set(acc.Tags()["images"]) == {"rollout/frame", "rollout/video"}
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (3, 0.125)]
  png = acc.Images("rollout/frame")[0]
  assert (png.width, png.height) == (14, 10)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.encoded_image_string))), image)
  gif = acc.Images("rollout/video")[0]
  assert (gif.step, gif.width, gif.height) == (3, 12, 8)
  decoded = [np.asarray(f.convert("RGB")) for f in
             ImageSequence.Iterator(Image.open(io.BytesIO(gif.encoded_image_string)))]
  assert len(decoded) == 5  # every frame, in order (random frames: no two merge)
  assert np.abs(decoded[2].astype(int) - frames[2]).mean() < 40  # 256-colour palette


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics_log.MetricsWriter(str(tmp_path / "w"), enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_videos(1, {"v": np.zeros((2, 4, 4, 3), np.uint8)})
  writer.close()
  assert not (tmp_path / "w").exists()
