"""The ``lpips`` package (the parity oracle of mirage_jax/evaluation/lpips.py), imported
with torchvision's Python code only.

The registry's torchvision wheel is built against torch's CUDA build; beside the CPU torch
of the ``oracle`` extra its C++ ops do not load, and ``import torchvision`` fails while it
registers them. LPIPS needs none of them (AlexNet and VGG16 are plain torch modules), so
the torchvision package is entered without running its ``__init__`` when that import fails.
Importing this module fails when lpips, torchvision or torch is missing (conftest's
TEST_DEPENDENCIES checks it).
"""

import importlib
import importlib.util
import sys
import types

import torch  # noqa: F401  # pylint: disable=unused-import


def _torchvision_models():
  try:
    return importlib.import_module("torchvision.models")
  except (RuntimeError, OSError):
    pass
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]  # the half-imported package
  spec = importlib.util.find_spec("torchvision")
  package = types.ModuleType("torchvision")
  package.__path__ = list(spec.submodule_search_locations)
  package.__spec__ = spec
  sys.modules["torchvision"] = package
  models = importlib.import_module("torchvision.models")
  package.models = models
  return models


models = _torchvision_models()
lpips = importlib.import_module("lpips")
