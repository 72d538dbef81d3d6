"""LPIPS in JAX (mirage_jax/evaluation/lpips.py) against the lpips package, its weight
files, and the tables that must not print a number without pretrained weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mirage_jax import weight_files
from mirage_jax.errors import InputError
from mirage_jax.evaluation import index_html, report, revisit
from mirage_jax.evaluation import lpips as ours


def _torch():
  return pytest.importorskip("torch")


def _reference(net: str, seed: int):
  """lpips.LPIPS with a random backbone (nothing downloaded) and the wheel's linear layers."""
  torch = _torch()
  oracle = pytest.importorskip("tests.lpips_oracle")
  torch.manual_seed(seed)
  return oracle.lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()


def _export_backbone(model, path: str) -> None:
  """The backbone as torchvision names it (lpips' ``net.slice<k>.<i>`` = ``features.<i>``)."""
  torch = _torch()
  sd = {"features." + k.split(".", 2)[2]: v.detach().clone()
        for k, v in model.state_dict().items() if k.startswith("net.slice")}
  torch.save(sd, path)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_parity_with_lpips_package(tmp_path, net):
  torch = _torch()
  model = _reference(net, seed=0)
  backbone = str(tmp_path / f"{net}.pth")
  _export_backbone(model, backbone)
  # The linear layers: the installed lpips wheel's file (a legacy torch stream), by default.
  scorer = ours.load(backbone, net)
  assert scorer.linear == ours.default_linear(net)
  assert scorer.linear.endswith(f"lpips/weights/v0.1/{net}.pth")
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
  b = np.clip(a.astype(np.int16) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
  b[0] = a[0]  # identical pair: 0
  with torch.no_grad():
    to_torch = lambda x: torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    want, layers = model(to_torch(a), to_torch(b), normalize=True, retPerLayer=True)
  want = want.numpy().reshape(-1)
  # Every one of the five layers adds to the distance: all of them are compared.
  assert all(float(l[1:].min()) > 1e-5 for l in layers), [float(l.min()) for l in layers]
  scorer.batch = 4  # two batches, the second padded
  got = scorer(a, b, data_range=255.0)
  assert got.shape == (5,)
  assert got[0] == 0.0 and want[0] == 0.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Leading axes and [0, 1] floats.
  got2 = scorer(a[None, 1:3] / 255.0, b[None, 1:3] / 255.0)
  np.testing.assert_allclose(got2, want[None, 1:3], rtol=1e-5)


def test_bad_weight_files(tmp_path):
  torch = _torch()
  model = _reference("alex", seed=0)
  good = str(tmp_path / "alex.pth")
  _export_backbone(model, good)
  sd = {k: v for k, v in model.state_dict().items() if k.startswith("net.slice")}
  sd = {"features." + k.split(".", 2)[2]: v for k, v in sd.items()}
  missing = {k: v for k, v in sd.items() if k != "features.6.weight"}
  torch.save(missing, tmp_path / "missing.pth")
  with pytest.raises(InputError) as e:
    ours.load(str(tmp_path / "missing.pth"), "alex")
  assert (e.value.where, e.value.field) == (str(tmp_path / "missing.pth"), "features.6.weight")
  assert "missing" in str(e.value)
  # A VGG16 file given as AlexNet: the first convolution's shape differs.
  wrong = dict(sd, **{"features.0.weight": torch.zeros(64, 3, 3, 3)})
  torch.save(wrong, tmp_path / "wrong.pth")
  with pytest.raises(InputError, match=r"shape \(64, 3, 3, 3\), expected \(64, 3, 11, 11\)") as e:
    ours.load(str(tmp_path / "wrong.pth"), "alex")
  assert e.value.field == "features.0.weight"
  # The linear layers of another net.
  vgg_linear = ours.default_linear("vgg")
  with pytest.raises(InputError) as e:
    ours.load(good, "alex", linear=vgg_linear)
  assert (e.value.where, e.value.field) == (vgg_linear, "lin1.model.1.weight")
  # Random (untrained) linear layers: LPIPS' are >= 0.
  random_lin = {f"lin{k}.model.1.weight": torch.randn(1, c, 1, 1)
                for k, c in enumerate([64, 192, 384, 256, 256])}
  torch.save(random_lin, tmp_path / "random_lin.pth")
  with pytest.raises(InputError, match="negative or NaN weights") as e:
    ours.load(good, "alex", linear=str(tmp_path / "random_lin.pth"))
  assert e.value.field == "lin0.model.1.weight"
  # Not a weight file at all; the backbone given where the linear layers go.
  (tmp_path / "junk.pth").write_bytes(b"junk")
  with pytest.raises(InputError, match="not a torch zip"):
    ours.load(str(tmp_path / "junk.pth"), "alex")
  with pytest.raises(InputError) as e:
    ours.load(good, "alex", linear=good)
  assert e.value.field == "lin0.model.1.weight"
  # A safetensors backbone reads the same.
  st = str(tmp_path / "alex.safetensors")
  with weight_files.open_weights(good) as w:
    weight_files.write_safetensors(st, {k: w.read(k) for k in w.keys()})
  x = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)
  np.testing.assert_array_equal(ours.load(st)(x, x[:, ::-1]), ours.load(good)(x, x[:, ::-1]))
  # Images too small for AlexNet's pooling: a clear error, not an empty reduction.
  assert (ours.min_size("alex"), ours.min_size("vgg")) == (31, 16)
  with pytest.raises(ValueError, match="needs at least 31 pixels"):
    ours.load(st)(x[:, :30], x[:, :30])


def _trajectory(t: int = 6) -> revisit.Trajectory:
  rng = np.random.default_rng(0)
  return revisit.Trajectory(
      name="t", frames=rng.integers(0, 256, (t, 16, 16, 3), dtype=np.uint8),
      depths=np.ones((t, 16, 16), np.float32), intrinsics=np.tile(np.eye(3), (t, 1, 1)),
      poses_c2w=np.tile(np.eye(4), (t, 1, 1)), dynamic_masks=np.zeros((t, 16, 16), np.uint8))


def test_score_frames_computes_lpips_only_when_given():
  truth = _trajectory()
  frames = np.clip(truth.frames.astype(int) + 20, 0, 255).astype(np.uint8)
  pairs = np.array([-1, -1, -1, -1, 1, 2])
  unseen = np.array([False, True, True, False, False, False])
  calls = []

  def fake(a, b):  # stands for an LPIPS: per-frame mean absolute difference
    calls.append(a.shape)
    return np.abs(np.asarray(a) - np.asarray(b)).mean(axis=(1, 2, 3))

  plain = revisit.score_frames(frames, truth, pairs, first_visit=unseen)
  assert not [k for k in plain if k.startswith("lpips")]
  s = revisit.score_frames(frames, truth, pairs, first_visit=unseen, lpips=fake)
  assert calls == [(6, 16, 16, 3)]  # one batched call, [0, 1] floats
  per = fake(frames / 255.0, truth.frames / 255.0)
  assert np.isnan(s["lpips_per_frame"][0])  # the given frame
  np.testing.assert_allclose(s["lpips_per_frame"][1:], per[1:], rtol=1e-6)
  np.testing.assert_allclose(s["lpips_all"], per[1:].mean(), rtol=1e-6)
  np.testing.assert_allclose(s["lpips_revisit"], per[4:].mean(), rtol=1e-6)
  np.testing.assert_allclose(s["lpips_unseen"], per[1:3].mean(), rtol=1e-6)
  summary, curves = revisit.summarize({"t": dict(rows={"voxel": s}, reference={},
                                                 revisit_frames=2, first_visit=unseen)})
  assert summary["voxel"]["lpips_revisit"] == pytest.approx(s["lpips_revisit"])
  assert "lpips" in curves["voxel"]
  assert "lpips" not in revisit.summarize({"t": dict(rows={"voxel": plain}, reference={},
                                                     revisit_frames=2)})[1]["voxel"]


def _revisit_page(folder, weights, lpips_revisit=None) -> str:
  row = dict(psnr_all=20.0, ssim_all=0.5, psnr_revisit=21.0, ssim_revisit=0.6)
  if lpips_revisit is not None:
    row.update(lpips_all=0.3, lpips_revisit=lpips_revisit, lpips_unseen=0.2)
  os.makedirs(folder)
  report.write_metrics_json(os.path.join(folder, "metrics.json"), dict(
      benchmark="revisit", lpips=weights, revisit=dict(
          summary=dict(voxel=row, none=dict(row), reference={}, revisit_frames=3),
          trajectories={"t": dict(rows={"voxel": row})})))
  return open(index_html.write_index(folder)).read()


def test_tables_say_lpips_was_not_scored_without_weights(tmp_path):
  """No weights: every row's LPIPS cell says so (never a number); with them, the numbers."""
  text = _revisit_page(str(tmp_path / "none"), None)
  assert text.count(f"<td>{ours.NO_WEIGHTS}</td>") == 2 * 3  # 2 rows x lpips_{all,revisit,unseen}
  assert "<th>lpips_revisit</th>" in text
  described = dict(net="alex", backbone="/w/a.pth", linear="/w/l.pth", version="0.1")
  text = _revisit_page(str(tmp_path / "alex"), described, lpips_revisit=0.125)
  assert ours.NO_WEIGHTS not in text and "<td>0.125</td>" in text
  # The cells even when a (stale) number sits in a summary whose run had no weights.
  rows = ours.table_rows([dict(row="voxel", lpips_revisit=0.1, psnr_revisit=20.0)],
                         ["row", "psnr_revisit", "lpips_revisit"], None)
  table = report.format_table(rows, ["row", "psnr_revisit", "lpips_revisit"])
  assert ours.NO_WEIGHTS in table and "0.100" not in table and "20.000" in table
  json.dumps(rows)  # still JSON


def test_default_linear_layers_and_unknown_net():
  path = ours.default_linear("alex")
  if path is not None:  # the lpips wheel is installed (the oracle extra)
    with weight_files.open_weights(path) as w:
      assert {k: w.shape(k) for k in w.keys()} == ours.linear_shapes("alex")
  with pytest.raises(InputError, match="unknown 'squeeze'") as e:
    ours.load("/nonexistent.pth", "squeeze")
  assert e.value.field == "lpips_net"
