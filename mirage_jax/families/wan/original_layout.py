"""Where each parameter of a ported network comes from in the original (PyTorch) files.

A ported model (``wan_dit``, ``wan_vae``) describes its weights in the original naming with
``original_layout(cfg) -> dict[param_path, OriginalTensor]``. The converter streams tensors
from the released files through that table, and the reverse export (weights trained here ->
the reference's files) walks it backwards. Nothing here reads files.

A parameter of ours may be a stack of several original tensors (scanned layers: one original
key per layer, stacked on a new leading axis). Each original tensor maps to its slice by
``transpose(perm)`` then ``reshape(shape)``; the inverse is the reverse reshape/transpose.

``param_path`` is the tuple of keys of the parameter in ``nnx.state(model)`` (the same path
``nnx.State.flat_state()`` gives), e.g. ``("blocks", "self_attn", "wq")``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OriginalTensor:
  """One parameter of ours in terms of original tensors.

  Attributes:
    keys: original key per stacked slice (``len(keys) == 1`` and ``stacked=False`` for an
      unstacked parameter).
    original_shape: shape of each original tensor.
    shape: shape of each slice of ours (the parameter's shape without the stack axis).
    perm: axes permutation applied to the original tensor before the reshape (None: none).
    stacked: the parameter has a leading axis of ``len(keys)`` slices.
  """
  keys: tuple[str, ...]
  original_shape: tuple[int, ...]
  shape: tuple[int, ...]
  perm: tuple[int, ...] | None = None
  stacked: bool = False

  def __post_init__(self):
    if not self.stacked and len(self.keys) != 1:
      raise ValueError(f"unstacked OriginalTensor needs one key, got {self.keys}")
    if int(np.prod(self.original_shape)) != int(np.prod(self.shape)):
      raise ValueError(f"{self.keys[0]}: {self.original_shape} cannot become {self.shape}")

  @property
  def param_shape(self) -> tuple[int, ...]:
    return ((len(self.keys),) + self.shape) if self.stacked else self.shape

  def to_ours(self, original: np.ndarray) -> np.ndarray:
    """One original tensor (``original_shape``) -> its slice of ours (``shape``)."""
    x = original if self.perm is None else np.transpose(original, self.perm)
    return np.reshape(x, self.shape)

  def to_original(self, ours: np.ndarray) -> np.ndarray:
    """One slice of ours (``shape``) -> the original tensor (``original_shape``)."""
    if self.perm is None:
      return np.reshape(ours, self.original_shape)
    permuted = tuple(self.original_shape[p] for p in self.perm)
    return np.transpose(np.reshape(ours, permuted), np.argsort(self.perm))


def stacked(keys: Sequence[str], original_shape: Sequence[int], shape: Sequence[int],
            perm: Sequence[int] | None = None) -> OriginalTensor:
  """An OriginalTensor stacked over ``keys`` (one per layer)."""
  return OriginalTensor(tuple(keys), tuple(original_shape), tuple(shape),
                        None if perm is None else tuple(perm), stacked=True)


def single(key: str, original_shape: Sequence[int], shape: Sequence[int] | None = None,
           perm: Sequence[int] | None = None) -> OriginalTensor:
  """An OriginalTensor of one original key (shape defaults to the permuted original)."""
  original_shape = tuple(original_shape)
  if shape is None:
    shape = original_shape if perm is None else tuple(original_shape[p] for p in perm)
  return OriginalTensor((key,), original_shape, tuple(shape),
                        None if perm is None else tuple(perm))


def load_params(layout: dict[ParamPath, OriginalTensor], get) -> dict[ParamPath, np.ndarray]:
  """All parameters of ours from an original state dict (tests and small models).

  Args:
    layout: ``original_layout(cfg)`` of a model.
    get: ``key -> np.ndarray`` in the original naming and shape.
  Returns:
    ``{param_path: array}`` ready for ``nnx.State.from_flat_path`` / ``nnx.update``.
  """
  out = {}
  for path, t in layout.items():
    slices = [t.to_ours(np.asarray(get(k))) for k in t.keys]
    out[path] = np.stack(slices) if t.stacked else slices[0]
  return out


def original_shapes(layout: dict[ParamPath, OriginalTensor]) -> dict[str, tuple[int, ...]]:
  """``{original key: original shape}`` of every tensor a layout reads."""
  return {k: t.original_shape for t in layout.values() for k in t.keys}


def random_original(layout: dict[ParamPath, OriginalTensor], seed: int,
                    keep=lambda key: True) -> dict[str, np.ndarray]:
  """Random f32 weights in the original naming and shapes (tests, benchmarks, tiny
  "pretrained" models), scaled so activations stay O(1) through any depth.

  Weights are (out, in, *kernel) as PyTorch stores them, so fan-in is the product of all but
  the first dimension; norm gains sit near 1 and biases near 0, but are never exactly 1 or 0,
  so a gain or bias loaded into the wrong place changes the output.

  Args:
    layout: ``original_layout(cfg)`` of a model.
    seed: numpy seed; keys are drawn in sorted order, so the result depends only on it and
      on the set of keys kept.
    keep: ``key -> bool`` filter (e.g. one file's keys).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in sorted(original_shapes(layout).items()):
    if not keep(key):
      continue
    if key.endswith("modulation"):  # added to a time projection of unit scale
      x = rng.standard_normal(shape) / np.sqrt(shape[-1])
    elif key.endswith(".gamma") or ("norm" in key and key.endswith(".weight")):
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif key.endswith(".bias"):
      x = 0.1 * rng.standard_normal(shape)
    else:
      x = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))
    out[key] = x.astype(np.float32)
  return out
