"""LPIPS in JAX (mirage_jax/evaluation/lpips.py) against the lpips package, its weight
files, and the tables that must not print a number without pretrained weights."""

from __future__ import annotations

import numpy as np
import pytest

from mirage_jax import weight_files
from mirage_jax.errors import InputError
from mirage_jax.evaluation import lpips as ours

torch = pytest.importorskip("torch")
oracle = pytest.importorskip("tests.lpips_oracle")


def _reference(net: str, seed: int):
  """lpips.LPIPS with a random backbone (nothing downloaded) and the wheel's linear layers."""
  torch.manual_seed(seed)
  return oracle.lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()


def _export_backbone(model, path: str) -> None:
  """The backbone as torchvision names it (lpips' ``net.slice<k>.<i>`` = ``features.<i>``)."""
  sd = {"features." + k.split(".", 2)[2]: v.detach().clone()
        for k, v in model.state_dict().items() if k.startswith("net.slice")}
  torch.save(sd, path)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_parity_with_lpips_package(tmp_path, net):
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
