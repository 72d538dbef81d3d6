"""The ``lpips`` package (the parity oracle of mirage_jax/evaluation/lpips.py), imported
without torchvision.

``lpips`` builds its backbones with ``torchvision.models.alexnet`` / ``vgg16``, but the
registry's torchvision wheels are built against torch's CUDA build: installed beside the
CPU torch of the ``oracle`` extra, ``import torchvision`` fails, and with it every import of
transformers and diffusers (both probe torchvision), i.e. every other parity test. So the
``oracle`` extra has no torchvision, and this module gives ``lpips`` a ``torchvision.models``
with the two backbones as torchvision defines them (layer order and indices are what the
released state dicts ``features.<i>.weight`` and ``lpips``' slices refer to). Everything
LPIPS itself computes (input scaling, feature slices, unit normalisation, the linear layers,
the spatial mean) stays the package's own code. Importing this module fails when lpips or
torch is missing (conftest's TEST_DEPENDENCIES checks it).
"""

import importlib
import importlib.util
import sys
import types

import torch
from torch import nn


def _alexnet_features() -> nn.Sequential:
  """torchvision's AlexNet ``features`` (indices 0..12)."""
  return nn.Sequential(
      nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2))


def _vgg16_features() -> nn.Sequential:
  """torchvision's VGG16 (configuration "D", no batch norm) ``features`` (indices 0..30)."""
  layers, channels = [], 3
  for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M"):
    if width == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
      # torchvision's VGG init (PyTorch's default one fades to zero through 13 layers).
      nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
      nn.init.zeros_(conv.bias)
      layers += [conv, nn.ReLU(inplace=True)]
      channels = width
  return nn.Sequential(*layers)


class _Backbone(nn.Module):

  def __init__(self, features: nn.Sequential):
    super().__init__()
    self.features = features


def _models() -> types.ModuleType:
  """A ``torchvision.models`` stand-in with ``alexnet`` and ``vgg16`` (random weights only:
  the parity tests load their own)."""
  def make(features):
    def build(pretrained: bool = False, **kwargs):
      if pretrained or kwargs.get("weights") is not None:
        raise ValueError("tests.lpips_oracle builds random backbones only (pnet_rand=True)")
      return _Backbone(features())
    return build
  models = types.ModuleType("torchvision.models")
  models.alexnet, models.vgg16 = make(_alexnet_features), make(_vgg16_features)
  return models


if importlib.util.find_spec("torchvision") is not None:
  raise ImportError("tests.lpips_oracle: torchvision is installed; beside the CPU torch it "
                    "breaks the transformers and diffusers imports: pip uninstall torchvision")
_package = types.ModuleType("torchvision")
_package.models = _models()
sys.modules.setdefault("torchvision", _package)
sys.modules.setdefault("torchvision.models", _package.models)
lpips = importlib.import_module("lpips")
assert torch  # the backbones above are torch modules
