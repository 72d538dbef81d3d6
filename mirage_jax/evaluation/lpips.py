"""LPIPS (Zhang et al. 2018, version 0.1): a learned perceptual distance, in JAX.

The distance of the ``lpips`` package's ``LPIPS(net=..., version="0.1")``: both images go
through a pretrained ImageNet backbone (torchvision's AlexNet or VGG16 ``features``); at
each of five ReLU outputs the features are unit-normalised along channels, their squared
difference weighted per channel by LPIPS' learned linear layer (a 1x1 convolution without
bias) and averaged over the image; the five averages are summed. Lower is closer; 0 for
identical images.

Weights, read torch-free through ``mirage_jax.weight_files`` (``.pth`` zip or legacy stream,
or ``.safetensors``), never downloaded and never random (a randomly initialised network
gives numbers that mean nothing, so without weights nothing is scored):

  * backbone (``--lpips_backbone``): a torchvision state dict, ``features.<i>.weight`` /
    ``.bias`` of the convolutions (the classifier is ignored), e.g. torchvision's
    ``alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``;
  * linear layers (``--lpips_linear``): ``lin<k>.model.1.weight`` of shape (1, C_k, 1, 1),
    the ``lpips`` wheel's ``lpips/weights/v0.1/<net>.pth``; by default read from the
    installed ``lpips`` package (found, not imported: importing it needs torch).

Images are (..., H, W, 3) in [0, data_range]; they are mapped to [-1, 1] and shifted and
scaled per channel as the package's ``ScalingLayer`` does. Frames are scored in fixed-size
batches under one ``jax.jit`` (one compile per image size).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from mirage_jax.errors import InputError

# JAX and the weight readers are imported where used: command lines (``main_job``) define
# this module's flags before JAX loads.

NETS = ("alex", "vgg")
# The cell of an LPIPS column when no weights were given: no number, and the flag to give.
NO_WEIGHTS = "—, no LPIPS weights (--lpips_backbone)"
# The lpips package's ScalingLayer (ImageNet statistics in [-1, 1] units).
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_EPS = 1e-10  # lpips.normalize_tensor


@dataclasses.dataclass(frozen=True)
class _Conv:
  """A convolution of torchvision's ``features`` (always followed by a ReLU)."""
  index: int  # features.<index>
  out: int
  inp: int
  kernel: int
  stride: int
  pad: int


_POOL, _TAP = "pool", "tap"  # torchvision's MaxPool2d; a ReLU output LPIPS compares
# Each net: (layers in order, max-pool window and stride).
_ARCH: dict[str, tuple[tuple[Any, ...], tuple[int, int]]] = {
    "alex": ((_Conv(0, 64, 3, 11, 4, 2), _TAP, _POOL, _Conv(3, 192, 64, 5, 1, 2), _TAP, _POOL,
              _Conv(6, 384, 192, 3, 1, 1), _TAP, _Conv(8, 256, 384, 3, 1, 1), _TAP,
              _Conv(10, 256, 256, 3, 1, 1), _TAP), (3, 2)),
    "vgg": ((_Conv(0, 64, 3, 3, 1, 1), _Conv(2, 64, 64, 3, 1, 1), _TAP, _POOL,
             _Conv(5, 128, 64, 3, 1, 1), _Conv(7, 128, 128, 3, 1, 1), _TAP, _POOL,
             _Conv(10, 256, 128, 3, 1, 1), _Conv(12, 256, 256, 3, 1, 1),
             _Conv(14, 256, 256, 3, 1, 1), _TAP, _POOL,
             _Conv(17, 512, 256, 3, 1, 1), _Conv(19, 512, 512, 3, 1, 1),
             _Conv(21, 512, 512, 3, 1, 1), _TAP, _POOL,
             _Conv(24, 512, 512, 3, 1, 1), _Conv(26, 512, 512, 3, 1, 1),
             _Conv(28, 512, 512, 3, 1, 1), _TAP), (2, 2)),
}


def _tap_channels(net: str) -> list[int]:
  layers = _ARCH[net][0]
  return [layers[i - 1].out for i, layer in enumerate(layers) if layer == _TAP]


@functools.cache
def min_size(net: str) -> int:
  """The smallest image side ``net``'s layers leave at least one pixel of."""
  def last(size):
    for layer in _ARCH[net][0]:
      if isinstance(layer, _Conv):
        size = (size + 2 * layer.pad - layer.kernel) // layer.stride + 1
      elif layer == _POOL:
        window, stride = _ARCH[net][1]
        size = (size - window) // stride + 1
      if size < 1:
        return 0
    return size
  return next(n for n in range(1, 1024) if last(n) >= 1)


def _check_net(net: str) -> None:
  if net not in NETS:
    raise InputError("--lpips_net", "lpips_net", f"unknown {net!r} (known: {', '.join(NETS)})")


def default_linear(net: str) -> str | None:
  """The installed ``lpips`` package's ``weights/v0.1/<net>.pth``, or None (not installed).

  The package is found, not imported (its import needs torch and torchvision; only its weight files are read).
  """
  _check_net(net)
  spec = importlib.util.find_spec("lpips")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, "weights", "v0.1", f"{net}.pth")
    if os.path.isfile(path):
      return path
  return None


def backbone_shapes(net: str) -> dict[str, tuple[int, ...]]:
  """The torchvision state-dict entries LPIPS reads of ``net``'s backbone, with their shapes."""
  _check_net(net)
  out = {}
  for c in _ARCH[net][0]:
    if isinstance(c, _Conv):
      out[f"features.{c.index}.weight"] = (c.out, c.inp, c.kernel, c.kernel)
      out[f"features.{c.index}.bias"] = (c.out,)
  return out


def linear_shapes(net: str) -> dict[str, tuple[int, ...]]:
  """The linear layers' entries (the lpips wheel's ``weights/v0.1/<net>.pth``), with shapes."""
  _check_net(net)
  return {f"lin{k}.model.1.weight": (1, ch, 1, 1) for k, ch in enumerate(_tap_channels(net))}


def _read(w, key: str, shape: tuple[int, ...], what: str) -> np.ndarray:
  if key not in w:
    raise InputError(w.path, key, f"missing: not {what} (its keys: "
                     f"{', '.join(sorted(w.keys())[:4]) or 'none'}{', ...' if len(w) > 4 else ''})")
  if tuple(w.shape(key)) != shape:
    raise InputError(w.path, key, f"shape {tuple(w.shape(key))}, expected {shape} ({what})")
  x = w.read(key)
  if not np.issubdtype(x.dtype, np.floating) and x.dtype != np.dtype("bfloat16"):
    raise InputError(w.path, key, f"dtype {x.dtype}, expected floating point ({what})")
  return np.asarray(x, np.float32)


def load_params(net: str, backbone: str, linear: str) -> dict[str, list]:
  """The backbone's convolutions and the linear layers, checked against ``net``.

  Returns:
    ``{"convs": [(w (O, I, k, k), b (O,)), ...], "lins": [(C_k,), ...]}`` float32 numpy.
  Raises:
    InputError: naming the file and the key of a missing tensor, a wrong shape, or a
      negative linear weight (an untrained layer).
  """
  from mirage_jax import weight_files  # pylint: disable=g-import-not-at-top
  _check_net(net)
  what = f"a torchvision {'AlexNet' if net == 'alex' else 'VGG16'} state dict"
  with weight_files.open_weights(backbone) as w:
    flat = [_read(w, key, shape, what) for key, shape in backbone_shapes(net).items()]
  with weight_files.open_weights(linear) as w:
    lins = [_read(w, key, shape, f"LPIPS v0.1 linear layers of {net!r}").reshape(-1)
            for key, shape in linear_shapes(net).items()]
  for key, lin in zip(linear_shapes(net), lins):
    # LPIPS clamps these to >= 0 while training: a negative one is an untrained (random) layer.
    if not np.all(lin >= 0):
      raise InputError(linear, key, f"{int(np.sum(~(lin >= 0)))} negative or NaN weights: not "
                       "LPIPS' trained linear layers (those are >= 0)")
  convs = list(zip(flat[0::2], flat[1::2]))  # (weight, bias) per convolution, in order
  return {"convs": convs, "lins": lins}


def distance(params, a, b, net: str):
  """LPIPS of image pairs (pure JAX; jit it with ``net`` static).

  Args:
    params: :func:`load_params`' dict (numpy or JAX arrays).
    a, b: (N, H, W, 3) float32 in [-1, 1].
  Returns:
    (N,) distances.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  layers, (window, stride) = _ARCH[net]
  shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
  # Both images in one batch: the backbone runs once.
  x = (jnp.concatenate([a, b]).astype(jnp.float32) - shift) / scale
  convs, taps = iter(params["convs"]), []
  for layer in layers:
    if isinstance(layer, _Conv):
      w, bias = next(convs)
      # HIGHEST: no reduced-precision (e.g. TF32) convolutions on accelerators.
      x = jax.lax.conv_general_dilated(
          x, jnp.asarray(w), (layer.stride,) * 2, [(layer.pad, layer.pad)] * 2,
          dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=jax.lax.Precision.HIGHEST)
      x = jax.nn.relu(x + jnp.asarray(bias))
    elif layer == _POOL:  # MaxPool2d without padding, floor mode: VALID
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                (1, stride, stride, 1), "VALID")
    else:
      taps.append(x)
  n = a.shape[0]
  total = jnp.zeros((n,), jnp.float32)
  for f, lin in zip(taps, params["lins"]):
    f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)
    d = (f[:n] - f[n:]) ** 2
    total = total + jnp.mean(jnp.sum(d * jnp.asarray(lin), axis=-1), axis=(1, 2))
  return total


@functools.cache
def _jitted():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(distance, static_argnames="net")


@dataclasses.dataclass
class LPIPS:
  """A loaded LPIPS: ``scorer(a, b)`` -> per-frame distances.

  Attributes:
    net: "alex" or "vgg". backbone, linear: the weight files it was loaded from.
    params: :func:`load_params`' dict, as JAX arrays.
    batch: image pairs per jitted call (a fixed size: one compile per image size; the last
      batch is padded); None: up to 16, fewer for large images (batch x H x W at most 4M
      pixels, which bounds VGG16's activations).
  """
  net: str
  backbone: str
  linear: str
  params: dict
  batch: int | None = None

  def __call__(self, a, b, data_range: float = 1.0) -> np.ndarray:
    """LPIPS per frame.

    Args:
      a, b: (..., H, W, 3) images in [0, data_range] (uint8 with ``data_range=255``).
    Returns:
      (...) float32 numpy.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.ndim < 3 or a.shape[-1] != 3:
      raise ValueError(f"LPIPS: expected two (..., H, W, 3) images, got {a.shape} and {b.shape}")
    lead = a.shape[:-3]
    a, b = (x.reshape((-1,) + x.shape[-3:]) * (2.0 / data_range) - 1.0 for x in (a, b))
    n, (h, w) = len(a), a.shape[1:3]
    if min(h, w) < min_size(self.net):
      raise ValueError(f"LPIPS ({self.net}): images of {h}x{w}; its backbone needs at least "
                       f"{min_size(self.net)} pixels a side")
    batch = self.batch or max(1, min(16, (1 << 22) // (h * w)))
    out = []
    for i in range(0, n, batch):
      pa, pb = a[i:i + batch], b[i:i + batch]
      pad = batch - len(pa)
      if pad:
        pa, pb = (np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) for x in (pa, pb))
      out.append(np.asarray(_jitted()(self.params, pa, pb, net=self.net))[:len(pa) - pad])
    return (np.concatenate(out) if out else np.zeros((0,), np.float32)).reshape(lead)

  def describe(self) -> dict[str, str]:
    """What metrics.json records of it."""
    return dict(net=self.net, backbone=os.path.abspath(self.backbone),
                linear=os.path.abspath(self.linear), version="0.1")


def load(backbone: str, net: str = "alex", linear: str | None = None,
         flag: str = "--lpips_linear") -> LPIPS:
  """An LPIPS scorer from a backbone file and the linear layers (default: the installed
  ``lpips`` package's).

  Raises:
    InputError: no linear layers (``lpips`` not installed and none given), or a bad file.
  """
  _check_net(net)
  if linear is None:
    linear = default_linear(net)
    if linear is None:
      raise InputError(flag, flag.lstrip("-"), f"no LPIPS linear layers: give the lpips "
                       f"wheel's lpips/weights/v0.1/{net}.pth (or pip install --no-deps lpips==0.1.4)")
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(jax.numpy.asarray, load_params(net, backbone, linear))
  return LPIPS(net=net, backbone=backbone, linear=linear, params=params)


def mark_unscored(rows: Sequence[dict], columns: Sequence[str]) -> list[dict]:
  """``rows`` with every LPIPS column (``lpips*``) of ``columns`` set to :data:`NO_WEIGHTS`:
  how a table says LPIPS was not scored, rather than printing a number or a bare dash."""
  cols = [c for c in columns if c.startswith("lpips")]
  return [{**r, **{c: NO_WEIGHTS for c in cols}} for r in rows]


def table_rows(rows: Sequence[dict], columns: Sequence[str], described: Any) -> list[dict]:
  """A table's rows of one evaluation: as they are when LPIPS was scored (``described`` is
  metrics.json's ``lpips`` entry), else marked unscored (:func:`mark_unscored`)."""
  return list(rows) if described else mark_unscored(rows, columns)


class Flags:
  """``--lpips_backbone``, ``--lpips_net``, ``--lpips_linear`` of an entry point
  (:func:`define_flags`)."""

  def __init__(self):
    from absl import flags  # pylint: disable=g-import-not-at-top
    self.backbone = flags.DEFINE_string(
        "lpips_backbone", None, "LPIPS: the backbone's torchvision state dict (.pth or "
        ".safetensors; alexnet-owt-7be5be79.pth for --lpips_net=alex, vgg16-397923af.pth for "
        "vgg). Without it LPIPS is not scored and its columns say so.")
    self.net = flags.DEFINE_enum("lpips_net", "alex", list(NETS), "LPIPS backbone.")
    self.linear = flags.DEFINE_string(
        "lpips_linear", None, "LPIPS v0.1 linear layers (default: the installed lpips "
        "package's lpips/weights/v0.1/<net>.pth).")

  def load(self) -> LPIPS | None:
    """The scorer the flags ask for, or None without ``--lpips_backbone``."""
    if not self.backbone.value:
      if self.linear.value:
        raise InputError("--lpips_linear", "lpips_linear", "given without --lpips_backbone")
      return None
    return load(self.backbone.value, self.net.value, self.linear.value)

  def args(self) -> list[str]:
    """The flags as given, for another command line (``main_job`` -> ``evaluate``)."""
    out = []
    if self.backbone.value:
      out += [f"--lpips_backbone={os.path.abspath(self.backbone.value)}",
              f"--lpips_net={self.net.value}"]
    if self.linear.value:
      out.append(f"--lpips_linear={os.path.abspath(self.linear.value)}")
    return out


def define_flags() -> Flags:
  """Defines the LPIPS flags of an entry point (call once, at import)."""
  return Flags()
